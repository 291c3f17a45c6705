"""sha256 manifests: write/verify round trip, the documented digest format, and tamper detection."""

import hashlib
import json
from pathlib import Path

import pytest

from trainer.export import MANIFEST_NAME, ManifestError, verify_manifest, write_manifest


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    (d / "config.json").write_text('{"a": 1}\n')
    (d / "sub" / "extra.txt").write_text("x")
    return d


def test_write_manifest_lists_every_file_but_itself_with_documented_digest(model_dir: Path) -> None:
    """Every file (recursively, POSIX relpaths) is hashed; the digest is sha256 of sorted 'path  hash' lines."""
    manifest = write_manifest(model_dir)
    on_disk = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    expected = {
        rel: hashlib.sha256((model_dir / rel).read_bytes()).hexdigest()
        for rel in ("config.json", "model.safetensors", "sub/extra.txt")
    }
    assert on_disk["files"] == expected
    lines = "".join(f"{rel}  {expected[rel]}\n" for rel in sorted(expected))
    assert on_disk["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    # Rewriting must not pick up the manifest itself.
    assert write_manifest(model_dir) == manifest


def test_verify_manifest_returns_digest_when_untouched(model_dir: Path) -> None:
    """An unchanged directory verifies and yields its manifest sha256."""
    manifest = write_manifest(model_dir)
    assert verify_manifest(model_dir) == manifest["sha256"]


def test_verify_manifest_detects_one_flipped_byte(model_dir: Path) -> None:
    """Changing a single byte of the weights is reported as a changed file."""
    write_manifest(model_dir)
    blob = bytearray((model_dir / "model.safetensors").read_bytes())
    blob[100] ^= 0x01
    (model_dir / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match=r"changed: model\.safetensors"):
        verify_manifest(model_dir)


def test_verify_manifest_detects_added_and_removed_files(model_dir: Path) -> None:
    """A removed file and an added file are both listed."""
    write_manifest(model_dir)
    (model_dir / "sub" / "extra.txt").unlink()
    (model_dir / "evil.py").write_text("import os")
    with pytest.raises(ManifestError, match=r"missing: sub/extra\.txt.*unexpected: evil\.py"):
        verify_manifest(model_dir)


def test_verify_manifest_detects_edited_manifest_digest(model_dir: Path) -> None:
    """A manifest whose top-level sha256 does not match its own file list is rejected."""
    manifest = write_manifest(model_dir)
    manifest["sha256"] = "0" * 64
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="own sha256"):
        verify_manifest(model_dir)


def test_verify_manifest_rejects_missing_or_malformed_manifest(model_dir: Path) -> None:
    """No manifest, or one without the required keys, is a clear error."""
    with pytest.raises(ManifestError, match="no manifest"):
        verify_manifest(model_dir)
    (model_dir / MANIFEST_NAME).write_text('{"files": {}}')
    with pytest.raises(ManifestError, match="malformed"):
        verify_manifest(model_dir)


def test_write_manifest_rejects_non_directory(tmp_path: Path) -> None:
    """Hashing a path that is not a directory fails loudly."""
    with pytest.raises(NotADirectoryError):
        write_manifest(tmp_path / "nope")
