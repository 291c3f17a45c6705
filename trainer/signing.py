"""Signed model directories: an OpenSSF ``model-signing`` signature plus a distillation attestation (docs/signing.md).

Two files sit inside a signed directory, next to the weights:

* ``model.sig``: the ``model-signing`` 1.1.1 Sigstore bundle; its DSSE payload is an in-toto Statement listing the
  sha256 of every file of the directory (``manifest.json`` included, the two signature files excluded).
* ``distillation.sigstore.json``: a bundle of the same shape (DSSE, ``application/vnd.in-toto+json``, the signing
  key's hint) whose in-toto Statement has the student's manifest sha256 as subject and the distillation edge as
  predicate (:data:`PREDICATE_TYPE`; fields in docs/signing.md).

Keys are ECDSA (P-256 by default; model-signing also takes P-384/P-521) PEM files. A key's *fingerprint* is the
sha256 hex of its PEM SubjectPublicKeyInfo: the ``publicKey.hint`` model-signing writes into a bundle, so the
verifier knows which trusted key to check against, and an unknown signer is named by it.

No torch import: the registry service imports this module (like :mod:`trainer.export`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trainer.export import file_sha256

__all__ = [
    "ATTESTATION_NAME",
    "KEY_ENV",
    "PREDICATE_TYPE",
    "SIGNATURE_FILES",
    "SIGNATURE_NAME",
    "SignatureError",
    "Verified",
    "default_key_path",
    "fingerprint",
    "generate_key_pair",
    "public_pem",
    "read_attestation",
    "sign_directory",
    "signing_key_path",
    "verify_directory",
]

SIGNATURE_NAME = "model.sig"
ATTESTATION_NAME = "distillation.sigstore.json"
SIGNATURE_FILES = (SIGNATURE_NAME, ATTESTATION_NAME)
"""Excluded from the directory's ``manifest.json`` and from the signed file list (they sign it)."""
PREDICATE_TYPE = "https://oprd-ci.dev/attestation/distillation/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
KEY_ENV = "OPRD_SIGNING_KEY"
"""Path of the PEM private key used at export; unset: :func:`default_key_path`."""


class SignatureError(ValueError):
    """A directory is unsigned, signed by an untrusted key, or does not match its signature/attestation. The
    message starts with what does not match (``unsigned``, ``untrusted key``, ``signature mismatch``, ...)."""


@dataclass(frozen=True)
class Verified:
    """A directory whose model signature and attestation both verified against ``key_fingerprint``."""

    key_fingerprint: str
    files: dict[str, str]
    """The signed per-file sha256 digests (relpath -> hex)."""
    statement: dict[str, Any]
    """The attestation's in-toto Statement (``subject``, ``predicateType``, ``predicate``)."""
    signature_sha256: str
    """sha256 of the ``model.sig`` file: how a downstream attestation names this signature."""

    @property
    def subject_sha256(self) -> str:
        return str(self.statement["subject"][0]["digest"]["sha256"])

    @property
    def predicate(self) -> dict[str, Any]:
        return dict(self.statement["predicate"])


# ------------------------------------------------------------------------------------------------------- keys
def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/oprd-ci/keys/signing.pem`` (``~/.config`` when unset): outside any checkout, like
    ``~/.ssh``; ``bash scripts/setup.sh`` generates it once."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "oprd-ci" / "keys" / "signing.pem"


def signing_key_path() -> Path:
    """The private key export signs with: ``$OPRD_SIGNING_KEY`` or :func:`default_key_path` (not checked)."""
    raw = os.environ.get(KEY_ENV)
    return Path(raw).expanduser() if raw else default_key_path()


def generate_key_pair(private_path: Path) -> tuple[Path, Path]:
    """Write a new P-256 key: ``private_path`` (PKCS#8 PEM, mode 0600, unencrypted: a development key) and
    ``private_path.with_suffix('.pub')``. Refuses to overwrite an existing private key."""
    private_path = Path(private_path)
    if private_path.exists():
        raise FileExistsError(f"{private_path}: a key is already there (remove it first to rotate)")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = private_path.with_suffix(".pub")
    pub.write_bytes(_spki_pem(key.public_key()))
    return private_path, pub


def _spki_pem(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_pem(pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a public *or* private EC key PEM; ``SignatureError`` if it is neither."""
    try:
        if b"PRIVATE KEY" in pem:
            key = serialization.load_pem_private_key(pem, None).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"key: not a PEM EC key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError("key: only elliptic-curve keys are supported (model-signing key mode)")
    return _spki_pem(key)


def fingerprint(pem: bytes) -> str:
    """sha256 hex of the key's SubjectPublicKeyInfo PEM (model-signing's ``publicKey.hint``)."""
    return hashlib.sha256(public_pem(pem)).hexdigest()


# ---------------------------------------------------------------------------------------------------- signing
def _hashing_config():
    from model_signing import hashing

    # Every file counts (git metadata too); only the two signature files are left out.
    return hashing.Config().set_ignored_paths(paths=list(SIGNATURE_FILES), ignore_git_paths=False)


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding (DSSE v1 spec)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _hash_for(key) -> hashes.HashAlgorithm:
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[key.curve.key_size]


def sign_directory(
    directory: Path, private_key: Path, predicate: dict[str, Any], subject_sha256: str
) -> Path:
    """Sign ``directory`` with ``private_key`` (model-signing, key mode) and write its attestation: an in-toto
    Statement with subject ``{"sha256": subject_sha256}`` (the manifest digest) and ``predicate``, in DSSE.

    Returns the attestation path. ``FileNotFoundError`` when the key file is missing.
    """
    from model_signing import signing

    directory, private_key = Path(directory), Path(private_key)
    if not private_key.is_file():
        raise FileNotFoundError(
            f"{private_key}: no signing key (set ${KEY_ENV} or run `oprd-ci keys generate`)"
        )
    for name in SIGNATURE_FILES:  # a stale signature must not survive a failed re-sign
        (directory / name).unlink(missing_ok=True)
    cfg = (
        signing.Config()
        .use_elliptic_key_signer(private_key=private_key)
        .set_hashing_config(_hashing_config())
    )
    cfg.sign(directory, directory / SIGNATURE_NAME)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": directory.name, "digest": {"sha256": subject_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            **predicate,
            "model_signature_sha256": file_sha256(directory / SIGNATURE_NAME),
        },
    }
    key = serialization.load_pem_private_key(private_key.read_bytes(), None)
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(_pae(PAYLOAD_TYPE, payload), ec.ECDSA(_hash_for(key.public_key())))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": fingerprint(_spki_pem(key.public_key()))},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    out = directory / ATTESTATION_NAME
    out.write_text(json.dumps(bundle, indent=2) + "\n")
    return out


# -------------------------------------------------------------------------------------------------- verifying
def _bundle(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SignatureError(f"unsigned: no {path.name} ({what}) in the directory")
    try:
        bundle = json.loads(path.read_text())
        hint = str(bundle["verificationMaterial"]["publicKey"]["hint"])
        bundle["dsseEnvelope"]["signatures"][0]["sig"]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise SignatureError(f"malformed {path.name}: not a key-signed Sigstore bundle ({exc!r})") from exc
    bundle["_hint"] = hint
    return bundle


def _trusted(hint: str, trusted: dict[str, bytes], what: str) -> bytes:
    if hint not in trusted:
        raise SignatureError(
            f"untrusted key: the {what} is signed by key {hint[:16]}..., which is not among the trusted keys "
            f"({', '.join(k[:16] + '...' for k in sorted(trusted)) or 'none configured'})"
        )
    return trusted[hint]


def read_attestation(directory: Path, trusted: dict[str, bytes]) -> tuple[str, dict[str, Any]]:
    """Verify the DSSE signature of ``directory``'s attestation with the trusted key its hint names; returns
    ``(fingerprint, statement)``."""
    bundle = _bundle(Path(directory) / ATTESTATION_NAME, "distillation attestation")
    pem = _trusted(bundle["_hint"], trusted, "attestation")
    env = bundle["dsseEnvelope"]
    key = serialization.load_pem_public_key(pem)
    try:
        payload = base64.b64decode(env["payload"], validate=True)
        key.verify(
            base64.b64decode(env["signatures"][0]["sig"], validate=True),
            _pae(str(env["payloadType"]), payload),
            ec.ECDSA(_hash_for(key)),
        )
        statement = json.loads(payload)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"attestation signature: does not verify with key {bundle['_hint'][:16]}..."
        ) from exc
    if env["payloadType"] != PAYLOAD_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError(f"attestation: not a {PREDICATE_TYPE} in-toto statement")
    try:
        str(statement["subject"][0]["digest"]["sha256"])
        dict(statement["predicate"])
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise SignatureError(f"attestation: statement lacks subject digest or predicate ({exc!r})") from exc
    return bundle["_hint"], statement


def verify_directory(directory: Path, trusted: dict[str, bytes]) -> Verified:
    """Verify ``directory`` against ``trusted`` (fingerprint -> public key PEM): its model signature (the signed
    per-file digests must equal the files on disk: one changed byte is a mismatch naming the file) and its
    attestation (signature; its ``model_signature_sha256`` must be this ``model.sig``). Raises
    ``SignatureError``; does *not* compare the predicate with anything (the registry does, against evidence)."""
    from model_signing import verifying

    directory = Path(directory)
    sig_path = directory / SIGNATURE_NAME
    bundle = _bundle(sig_path, "model signature")
    pem = _trusted(bundle["_hint"], trusted, "model signature")
    with tempfile.NamedTemporaryFile(suffix=".pub") as f:
        f.write(pem)
        f.flush()
        cfg = (
            verifying.Config()
            .use_elliptic_key_verifier(public_key=f.name)
            .set_hashing_config(_hashing_config())
        )
        try:
            cfg.verify(directory, sig_path)
        except ValueError as exc:
            raise SignatureError(f"signature mismatch: {exc}") from exc
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    files = {r["name"]: r["digest"] for r in payload["predicate"]["resources"]}
    fp, statement = read_attestation(directory, trusted)
    sig_sha = file_sha256(sig_path)
    if statement["predicate"].get("model_signature_sha256") != sig_sha:
        raise SignatureError("attestation: names another model signature than this directory's model.sig")
    return Verified(key_fingerprint=fp, files=files, statement=statement, signature_sha256=sig_sha)
