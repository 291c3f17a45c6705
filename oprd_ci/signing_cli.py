"""``oprd-ci keys generate|add|list`` and ``oprd-ci verify DIR``: signing keys and signed model directories.

``keys generate`` writes a P-256 development key pair to ``$OPRD_SIGNING_KEY`` (default
``~/.config/oprd-ci/keys/signing.pem``); ``keys add PUB`` puts a public key into the registry keyring
(``$OPRD_TRUSTED_KEYS_DIR``, default ``~/.config/oprd-ci/trusted-keys``); ``keys list`` prints fingerprints.
``verify DIR`` checks a directory's model signature and distillation attestation against the keyring and prints
the chain (docs/signing.md). Errors end with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["keys_app", "register"]

keys_app = typer.Typer(
    help="Signing keys: generate the export key, manage the registry's trusted public keys.",
    no_args_is_help=True,
    add_completion=False,
)

KeyringOpt = Annotated[
    Path | None,
    typer.Option(
        "--keyring",
        help="Trusted-keys directory (default: $OPRD_TRUSTED_KEYS_DIR or ~/.config/oprd-ci/trusted-keys).",
    ),
]


def register(app: typer.Typer) -> None:
    """Add the ``keys`` group and the ``verify`` command to ``app``."""
    app.add_typer(keys_app, name="keys")
    app.command(name="verify")(verify)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _keyring(path: Path | None) -> Path:
    from server.settings import default_keyring

    raw = os.environ.get("OPRD_TRUSTED_KEYS_DIR")
    return (path or (Path(raw) if raw else default_keyring())).expanduser()


@keys_app.command()
def generate(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Private key path (default: $OPRD_SIGNING_KEY or ~/.config/...)."),
    ] = None,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Exit 0 when a key is already there.")
    ] = False,
) -> None:
    """Write a new ECDSA P-256 key pair (PEM; private 0600, public next to it as .pub) and print its fingerprint."""
    from trainer.signing import fingerprint, generate_key_pair, signing_key_path

    path = (out or signing_key_path()).expanduser()
    if path.exists():
        if if_missing:
            typer.echo(f"signing key {path} exists (fingerprint {fingerprint(path.read_bytes())})")
            return
        _fail(f"{path}: a key is already there (remove it first to rotate, or pass --if-missing)")
    priv, pub = generate_key_pair(path)
    typer.echo(
        f"wrote {priv} (private, keep it out of git) and {pub}; fingerprint {fingerprint(pub.read_bytes())}"
    )


@keys_app.command()
def add(
    public_key: Annotated[Path, typer.Argument(help="Public key PEM (a private key is refused).")],
    keyring: KeyringOpt = None,
) -> None:
    """Trust a public key: copy it into the registry keyring as ``<fingerprint>.pub``."""
    from trainer.signing import SignatureError, fingerprint

    if not public_key.is_file():
        _fail(f"{public_key}: not a file")
    pem = public_key.read_bytes()
    if b"PRIVATE KEY" in pem:
        _fail(f"{public_key}: is a private key; add the public one (.pub)")
    try:
        fp = fingerprint(pem)
    except SignatureError as exc:
        _fail(f"{public_key}: {exc}")
    ring = _keyring(keyring)
    ring.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_key, ring / f"{fp}.pub")
    typer.echo(f"trusted key {fp} in {ring}")


@keys_app.command(name="list")
def list_keys(keyring: KeyringOpt = None) -> None:
    """Print ``<fingerprint>  <file>`` for every key in the keyring."""
    from server.signatures import load_keyring

    ring = _keyring(keyring)
    keys = load_keyring(ring)
    if not keys:
        typer.echo(f"no trusted keys in {ring}")
    for fp in sorted(keys):
        typer.echo(fp)


def verify(
    directory: Annotated[
        Path | None, typer.Argument(help="A signed model directory (e.g. registry-store/<sha256>).")
    ] = None,
    champion: Annotated[
        str | None,
        typer.Option(
            "--champion", help="Verify MODEL's champion: its stored directory, plus its gate decision."
        ),
    ] = None,
    keyring: KeyringOpt = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="Trust only this public key PEM instead of the keyring.")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="Registry URL for --champion (default: in-process).")
    ] = None,
    token: Annotated[str | None, typer.Option(help="Bearer token for --champion.")] = None,
) -> None:
    """Verify DIR's manifest, model signature and distillation attestation; print the chain it attests."""
    from server.signatures import load_keyring
    from trainer.export import ManifestError, verify_manifest
    from trainer.signing import SignatureError, fingerprint, verify_directory

    decision = None
    if (directory is None) == (champion is None):
        _fail("give a directory or --champion MODEL (one of them)")
    if champion is not None:
        directory, decision = _champion(champion, url, token)
    assert directory is not None
    if not directory.is_dir():
        _fail(f"{directory}: not a directory")
    try:
        trusted = (
            {fingerprint(key.read_bytes()): key.read_bytes()} if key else load_keyring(_keyring(keyring))
        )
        manifest_sha = verify_manifest(directory)
        v = verify_directory(directory, trusted)
    except (SignatureError, ManifestError, OSError) as exc:
        _fail(f"{directory}: {exc}")
    if v.subject_sha256 != manifest_sha:
        _fail(
            f"{directory}: attestation subject {v.subject_sha256[:16]}... is not this directory ({manifest_sha})"
        )
    lines = chain_lines(directory, manifest_sha, v)
    if decision is not None:  # the registry's link: the decision that made this version the champion
        lines[-1] = (
            f"  gate decision  {decision['id']}: {decision['verdict']} of {decision['model']} v{decision['version']} "
            f"under policy v{decision['policy_version']} (registry record; not part of the signed attestation)"
        )
    typer.echo("\n".join(lines))


def _champion(name: str, url: str | None, token: str | None) -> tuple[Path, dict | None]:
    """The champion's stored directory and its decision, from the registry (in-process by default)."""
    from oprd_ci.registry_cli import RegistryCall, _local_status

    status = _local_status(name) if not url else None
    if status is None:
        with RegistryCall(url, token, reconcile=False) as call:
            status = call("GET", f"/v1/models/{name}/status")
    if not status.get("champion"):
        _fail(f"{name}: has no champion yet")
    return Path(status["champion"]["artifact_path"]), status.get("champion_decision")


def chain_lines(directory: Path, manifest_sha: str, v) -> list[str]:
    """The verified chain, teacher and student base -> student -> gate, one fact per line."""
    p = v.predicate

    def model(ref: dict | None) -> str:
        ref = ref or {}
        sig = ref.get("signature_sha256")
        return f"{ref.get('name')} manifest {ref.get('manifest_sha256')} ({'signed, model.sig ' + sig if sig else 'unsigned'})"

    code = p.get("code") or {}
    lines = [
        f"verified {directory}: model signature and distillation attestation, key {v.key_fingerprint}",
        f"  teacher        {model(p.get('teacher'))}",
        f"  student base   {model(p.get('student_base'))}",
        f"    -> distilled with method {p.get('method')}, loss config {p.get('loss_config_sha256')}",
        f"       layer plan {p.get('layer_plan')}",
        f"       tokenizer {p.get('tokenizer_sha256')}, chat template {p.get('chat_template_sha256') or 'none'}",
    ]
    lines += [f"       training data {k} {d}" for k, d in sorted((p.get("training_data") or {}).items())]
    lines += [
        f"       eval suite {k} file {r.get('digest')} graders "
        + ", ".join(f"{g} v{ver}" for g, ver in sorted((r.get("graders") or {}).items()))
        for k, r in sorted((p.get("eval_suites") or {}).items())
    ]
    lines += [
        f"       code commit {code.get('commit')}, dvc.lock {code.get('dvc_lock_sha256') or 'none'}",
        f"  student        {directory.name} manifest {manifest_sha} ({len(v.files)} files signed, model.sig {v.signature_sha256})",
        f"  gate decision  {p.get('gate_decision_id') or 'not attested (signed at export, before the gate; the registry links the decision)'}",
    ]
    return lines
