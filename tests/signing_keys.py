"""An ephemeral signing key pair for the whole test session (loaded as a plugin: ``-p signing_keys``).

Tests never read a developer's key: at configure time a fresh P-256 pair is written to a temporary directory,
``$OPRD_SIGNING_KEY`` points the distill stage at its private half and ``$OPRD_TRUSTED_KEYS_DIR`` is a keyring
holding its public half, so every stage and registry a test starts (subprocesses inherit the environment) signs
and verifies with it. Nothing is committed; the directory is removed at exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from trainer.signing import KEY_ENV, fingerprint, generate_key_pair

_ROOT: Path | None = None


def pytest_configure(config) -> None:
    global _ROOT
    _ROOT = Path(tempfile.mkdtemp(prefix="oprd-test-keys-"))
    priv, pub = generate_key_pair(_ROOT / "keys" / "signing.pem")
    ring = _ROOT / "trusted-keys"
    ring.mkdir()
    shutil.copyfile(pub, ring / f"{fingerprint(pub.read_bytes())}.pub")
    os.environ[KEY_ENV] = str(priv)
    os.environ["OPRD_TRUSTED_KEYS_DIR"] = str(ring)


def pytest_unconfigure(config) -> None:
    if _ROOT is not None:
        shutil.rmtree(_ROOT, ignore_errors=True)
