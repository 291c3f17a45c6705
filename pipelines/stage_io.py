"""What every DVC stage shares: where its inputs are, atomic JSON outputs, and its MLflow run.

Each stage is its own process. Its MLflow run id and the content hashes of what it wrote are stored next to its
outputs (``<stage>.mlflow.json``), so the downstream stage links to the run that produced the files it reads, even
when DVC skipped that stage this time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.stage_logs import quiet_third_party
from trainer.config import ConfigError, Params
from trainer.export import file_sha256  # dataset digests: content hashes, passed explicitly to MLflow

__all__ = [
    "BOOTSTRAP_RECORDS",
    "TASK_DIR",
    "TASK_DIRS",
    "USER_ERRORS",
    "atomic_write_text",
    "file_sha256",
    "prompts_file",
    "stage_cli",
    "val_file",
    "write_json",
]

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    FileNotFoundError,
    ValueError,  # includes trainer.models.CompatibilityError (not imported: it would pull torch into every CLI)
)
"""Problems the user fixes (config, inputs, data): one ``error:`` line and exit 2, no traceback."""

TASK_DIR = Path("artifacts/task")
TASK_DIRS = {"arithmetic": TASK_DIR, "toolcall": Path("artifacts/toolcall/task")}
"""Where each embedded task's splits live (``task.name`` -> the bootstrap stage's ``task`` output)."""
BOOTSTRAP_RECORDS = {
    "arithmetic": Path("artifacts/bootstrap.json"),
    "toolcall": Path("artifacts/toolcall/bootstrap.json"),
}
"""The record of the bootstrap stage that built each embedded task's pair (its MLflow source run logs it)."""


def prompts_file(params: Params) -> Path:
    """Training prompts (``task.prompts_file``; the embedded train split by default)."""
    return Path(params.task.prompts_file)


def val_file(params: Params) -> Path | None:
    """Validation problems for checkpoint selection: the val split of the embedded task ``task.name`` names
    (``None`` for external prompts)."""
    path = TASK_DIRS[params.task.name] / "val.jsonl"
    return path if params.models.embedded and path.is_file() else None


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and a rename, so a killed
    process never leaves a half-written file for DVC to cache. The file gets the usual ``0666 & ~umask`` mode
    (``tempfile.mkstemp`` would make it ``0600``). ``fsync``: flush to disk before the rename (the failure bank,
    which is committed to git, must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (:func:`atomic_write_text`): a killed stage never leaves a half-written metrics file."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def stage_cli(
    description: str,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    *,
    errors: tuple[type[BaseException], ...] = (),
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line every stage shares: ``--params FILE`` and repeatable ``--set KEY=VALUE``; ``body`` gets
    the parsed namespace. ``USER_ERRORS`` and ``errors`` end the stage with one ``error:`` line and exit 2 (a
    failed stage for DVC); anything else keeps its traceback."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    if extra_args is not None:
        extra_args(ap)
    args = ap.parse_args(argv)
    # Profiler lines, weight-loading bars, repeated warnings (pipelines.stage_logs); the fd-level filter only
    # for a real command line (argv None), never under an in-process caller that captures fd 2 itself.
    quiet_third_party(fd_filter=argv is None)
    try:
        return body(args)
    except (*USER_ERRORS, *errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
