"""sha256 manifests for exported model directories.

``manifest.json`` format (docs/contracts.md)::

    {"files": {"<relpath>": "<sha256 hex>", ...}, "sha256": "<sha256 of the manifest lines>"}

``relpath`` is POSIX-style and relative to the directory; every regular file below it is listed except
``manifest.json`` itself and the two top-level signature files (``model.sig``, ``distillation.sigstore.json``:
:mod:`trainer.signing`), which sign the directory *including* its manifest. The manifest lines are ``f"{relpath}  {hash}\\n"`` (two spaces, as ``sha256sum``
prints them) sorted by ``relpath`` and concatenated; their sha256 is the directory's single identity.

Pure standard library on purpose: this is the one implementation of the format, shared by the trainer's export,
the pipeline stages (``pipelines.stage_io.file_sha256``) and the registry service (``server.artifacts``), which
imports it without pulling in torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = [
    "MANIFEST_NAME",
    "UNLISTED",
    "ManifestError",
    "file_sha256",
    "hash_directory",
    "manifest_digest",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
UNLISTED = frozenset({MANIFEST_NAME, "model.sig", "distillation.sigstore.json"})
"""Top-level files a manifest never lists: itself and the signatures over it (trainer.signing.SIGNATURE_FILES)."""
_CHUNK = 1 << 20  # bytes read at a time, so multi-GB safetensors never sit in memory whole


class ManifestError(ValueError):
    """A directory does not match its manifest (or has none); the message lists every difference."""


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(files: dict[str, str]) -> str:
    """The directory identity: sha256 of the sorted ``"<relpath>  <sha256>\\n"`` lines of ``files``."""
    lines = "".join(f"{rel}  {files[rel]}\n" for rel in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_directory(directory: str | Path) -> dict[str, str]:
    """``{relpath: sha256}`` of every regular file under ``directory``, excluding the top-level :data:`UNLISTED`.

    Raises:
        NotADirectoryError: ``directory`` is not a directory.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    return {
        p.relative_to(root).as_posix(): file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in UNLISTED
    }


def write_manifest(directory: str | Path) -> dict[str, object]:
    """Hash every file of ``directory`` and write ``directory/manifest.json`` (overwriting an old one).

    Returns:
        The manifest dict that was written.
    """
    files = hash_directory(directory)
    manifest: dict[str, object] = {"files": files, "sha256": manifest_digest(files)}
    (Path(directory) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: str | Path) -> str:
    """Recompute the hashes of ``directory`` and compare them with its ``manifest.json``.

    Returns:
        The directory's manifest ``sha256`` when everything matches.

    Raises:
        ManifestError: the manifest is missing or malformed, or a file was changed, removed or added.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; run trainer.export.write_manifest on the directory")
    try:
        manifest = json.loads(path.read_text())
        recorded: dict[str, str] = dict(manifest["files"])
        recorded_digest = str(manifest["sha256"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ManifestError(
            f"{path}: malformed manifest ({exc}); expected keys 'files' and 'sha256'"
        ) from exc
    actual = hash_directory(directory)
    problems = [
        f"changed: {rel}" for rel in sorted(recorded) if rel in actual and actual[rel] != recorded[rel]
    ]
    problems += [f"missing: {rel}" for rel in sorted(set(recorded) - set(actual))]
    problems += [f"unexpected: {rel}" for rel in sorted(set(actual) - set(recorded))]
    if not problems and manifest_digest(recorded) != recorded_digest:
        problems.append("the manifest's own sha256 does not match its file list")
    if problems:
        raise ManifestError(f"{directory}: does not match {MANIFEST_NAME}: " + "; ".join(problems))
    return recorded_digest
