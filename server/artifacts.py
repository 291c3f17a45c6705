"""Artifact location and integrity checks. The service only hashes files; it never deserializes a model.

``manifest.json`` (docs/contracts.md): ``{"files": {relpath: sha256}, "sha256": sha256_of_listing}`` where the
listing is the UTF-8 text of one ``"<relpath>  <sha256>\\n"`` line per file, sorted by relpath.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# The one implementation of the manifest format (standard library only: importing it does not load torch).
from trainer.export import MANIFEST_NAME, UNLISTED, manifest_digest
from trainer.export import file_sha256 as sha256_file

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Pickle-bearing formats run code when loaded; a registered model must not carry them (reliability.md §4).
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ArtifactError(ValueError):
    """The artifact location is not allowed or its content does not match its manifest."""


@dataclass(frozen=True)
class VerifiedArtifact:
    path: Path
    files: dict[str, str]
    sha256: str


def listing_sha256(files: dict[str, str]) -> str:
    """The manifest's own ``sha256`` for ``files`` (:func:`trainer.export.manifest_digest`)."""
    return manifest_digest(files)


def resolve_artifact_path(raw: str, roots: list[Path]) -> Path:
    """Map a user-given location to a resolved local directory under one of ``roots``.

    Raises ``ArtifactError`` for URIs (any ``scheme:``), NUL bytes, ``..`` components, backslashes and
    paths that resolve (symlinks included) outside every allowed root.
    """
    if "\x00" in raw or "\\" in raw:
        raise ArtifactError("artifact_path: NUL bytes and backslashes are not allowed")
    if _REMOTE.match(raw) or raw.startswith("//"):
        raise ArtifactError(
            "artifact_path: only local directories are accepted (no URI schemes or '//' hosts)"
        )
    if any(part == ".." for part in Path(raw).parts):
        raise ArtifactError("artifact_path: '..' components are not allowed")
    # Messages quote the caller's own string, never the resolved path: that would reveal the server's working
    # directory or where a symlink points (issue 9).
    path = Path(raw).resolve()
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise ArtifactError(f"artifact_path: {raw!r} is outside the allowed artifact roots")
    if not path.is_dir():
        raise ArtifactError(f"artifact_path: {raw!r} is not a directory")
    return path


def verify_artifact(path: Path, expected_files: dict[str, str] | None = None) -> VerifiedArtifact:
    """Recompute every hash of the directory ``path`` and compare it with its ``manifest.json``.

    If ``expected_files`` is given (the manifest recorded at registration), the manifest on disk must also
    still equal it. Every regular file except ``manifest.json`` must be listed, and nothing listed may be
    missing. Raises ``ArtifactError`` naming the first mismatch.
    """
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError("artifact: manifest.json is missing") from exc
    except OSError as exc:  # the OSError text would name the absolute path
        raise ArtifactError(f"artifact: manifest.json cannot be read ({type(exc).__name__})") from exc
    except ValueError as exc:
        raise ArtifactError(f"artifact: manifest.json is not valid JSON ({exc})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or not files
        or not all(isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in files.items())
    ):
        raise ArtifactError("artifact: manifest.json needs a non-empty 'files' map of relpath -> sha256 hex")
    if listing_sha256(files) != manifest.get("sha256"):
        raise ArtifactError("artifact: manifest sha256 does not match its file listing")
    if expected_files is not None and files != expected_files:
        raise ArtifactError("artifact: manifest.json differs from the one recorded at registration")
    # The signature files sign the manifest, so it cannot list them (trainer.export.UNLISTED); the signing
    # check (server.signatures) verifies them.
    on_disk = {
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()
    } - UNLISTED
    for rel in sorted(on_disk | set(files)):
        if rel.endswith(FORBIDDEN_SUFFIXES):
            raise ArtifactError(
                f"artifact: {rel}: pickle-capable file types are refused (export safetensors)"
            )
        if rel not in files:
            raise ArtifactError(f"artifact: {rel} is not listed in manifest.json")
        file = path / rel
        if rel not in on_disk or file.is_symlink() or not file.resolve().is_relative_to(path):
            raise ArtifactError(f"artifact: {rel} is missing or not a regular file inside the directory")
        if sha256_file(file) != files[rel]:
            raise ArtifactError(f"artifact: {rel} sha256 does not match manifest.json")
    return VerifiedArtifact(path=path, files=dict(files), sha256=manifest["sha256"])
