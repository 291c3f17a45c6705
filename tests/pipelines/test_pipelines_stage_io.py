"""Atomic stage outputs (pipelines.stage_io.atomic_write_text): the usual file mode, and a failed write keeps the
old file and leaves no temporary behind."""

from __future__ import annotations

import os

import pytest

from pipelines.stage_io import atomic_write_text, write_json


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "eval.json", "{}\n")
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "eval.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").read_text() == '{\n  "x": 1\n}\n'


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "bank.jsonl"
    atomic_write_text(target, "old\n", fsync=True)
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "new \ud800 half\n")  # a lone surrogate fails in the middle of the write
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.jsonl"]
