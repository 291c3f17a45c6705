"""Artifact location and integrity checks. The service only hashes files; it never deserializes a model.

``manifest.json`` (docs/contracts.md): ``{"files": {relpath: sha256}, "sha256": sha256_of_listing}`` where the
listing is the UTF-8 text of one ``"<relpath>  <sha256>\\n"`` line per file, sorted by relpath.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# The one implementation of the manifest format (standard library only: importing it does not load torch).
from trainer.export import MANIFEST_NAME, UNLISTED, manifest_digest

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Pickle-bearing formats run code when loaded; a registered model must not carry them (reliability.md §4).
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
"""A manifest lists one ~70-byte line per file; 16 MiB is ~200k files. A larger one (or ``/dev/zero``) is refused
instead of being read into memory."""


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
    try:
        path = Path(raw).resolve()
        inside = any(path == root or path.is_relative_to(root) for root in roots)
        is_dir = inside and path.is_dir()
    except OSError as exc:  # ENAMETOOLONG (a component over NAME_MAX), ELOOP, EACCES: the caller's input
        raise ArtifactError(
            f"artifact_path: {raw[:64]!r}... cannot be used as a path ({_os_reason(exc)})"
            if len(raw) > 64
            else f"artifact_path: {raw!r} cannot be used as a path ({_os_reason(exc)})"
        ) from exc
    if not inside:
        raise ArtifactError(f"artifact_path: {raw!r} is outside the allowed artifact roots")
    if not is_dir:
        raise ArtifactError(f"artifact_path: {raw!r} is not a directory")
    return path


def _os_reason(exc: OSError) -> str:
    """The OS's reason without the file name (``strerror``, e.g. "File name too long")."""
    return exc.strerror or type(exc).__name__


def open_regular_file(path: Path, root: Path, field: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file inside ``root`` (symlinks resolved first).

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the opened descriptor, so a FIFO is refused instead
    of blocking the worker thread forever, a device (``/dev/zero``) is never read, and a swap between the check
    and the open cannot slip one in. Raises ``FileNotFoundError`` when it does not exist, ``ArtifactError``
    (starting with ``field``; never the resolved path) for everything else.
    """
    try:
        real = path.resolve()
    except OSError as exc:
        raise ArtifactError(f"{field}: cannot be resolved ({_os_reason(exc)})") from exc
    if not real.is_relative_to(root):
        raise ArtifactError(f"{field}: is not a regular file inside the artifact directory")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # the OSError text would name the absolute path
        raise ArtifactError(f"{field}: cannot be opened ({_os_reason(exc)})") from exc
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ArtifactError(f"{field}: is not a regular file (FIFOs, devices and sockets are refused)")
    return f


def read_regular_file(path: Path, root: Path, field: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` inside ``root`` (:func:`open_regular_file`), at most ``max_bytes``;
    a larger file raises ``ArtifactError`` without being read past the cap."""
    with open_regular_file(path, root, field) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ArtifactError(f"{field}: larger than {max_bytes} bytes")
    return data


def hash_regular_file(path: Path, root: Path, field: str) -> str:
    """sha256 hex of the regular file ``path`` inside ``root`` (:func:`open_regular_file`), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open_regular_file(path, root, field) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_artifact(path: Path, expected_files: dict[str, str] | None = None) -> VerifiedArtifact:
    """Recompute every hash of the directory ``path`` and compare it with its ``manifest.json``.

    If ``expected_files`` is given (the manifest recorded at registration), the manifest on disk must also
    still equal it. Every regular file except ``manifest.json`` must be listed, and nothing listed may be
    missing. Raises ``ArtifactError`` naming the first mismatch.
    """
    try:
        root = path.resolve()  # files must resolve inside the directory itself, wherever a link to it points
        raw = read_regular_file(path / MANIFEST_NAME, root, "artifact: manifest.json", MAX_MANIFEST_BYTES)
        manifest = json.loads(raw.decode("utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError("artifact: manifest.json is missing") from exc
    except OSError as exc:  # the OSError text would name the absolute path
        raise ArtifactError(f"artifact: manifest.json cannot be read ({type(exc).__name__})") from exc
    except ArtifactError:
        raise
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
        try:
            digest = hash_regular_file(file, root, f"artifact: {rel}")
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"artifact: {rel} is missing or not a regular file inside the directory"
            ) from exc
        if digest != files[rel]:
            raise ArtifactError(f"artifact: {rel} sha256 does not match manifest.json")
    return VerifiedArtifact(path=path, files=dict(files), sha256=manifest["sha256"])
