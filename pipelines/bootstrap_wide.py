"""The ``bootstrap_wide`` stage: the OPRD-Bridge demonstration teacher (oprd-method.md §5).

``python -m pipelines.bootstrap_wide --params params.yaml --out artifacts`` writes::

    artifacts/models/teacher-wide/     HF dir + manifest.json (best greedy val accuracy of its run)
    artifacts/bootstrap-wide.json      val curve, steps, wall time, architecture, manifest sha256

A wider and deeper teacher (``models.tiny_wide``; 160 wide and 6 blocks against the student base's 128 and 4) of
the same task, tokenizer and recipe as :mod:`pipelines.bootstrap`, trained from scratch with seed ``task.seed +
1`` on the same splits (same val/eval problems held out). It shares no lineage with the student base and differs
from it in hidden size and depth, the paper's Qwen3-4B -> Qwen3-1.7B setting in miniature. It lives in its own
stage and module so that the default bootstrap (teacher, student base: committed bit for bit) is untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipelines.bootstrap import BootstrapResult, save_model_dir, train_teacher
from pipelines.task import build_tokenizer
from pipelines.task import make_splits as make_task_splits
from trainer.config import ConfigError, Params, load_params

__all__ = ["main", "run_bootstrap_wide", "wide_params"]

WIDE_DIR = Path("models") / "teacher-wide"


def wide_params(params: Params) -> Params:
    """``params`` with ``models.tiny_wide`` as the architecture and ``task.seed + 1`` as the training seed."""
    models = params.models.model_copy(update={"tiny": params.models.tiny_wide})
    task = params.task.model_copy(update={"seed": params.task.seed + 1})
    return params.model_copy(update={"models": models, "task": task})


def run_bootstrap_wide(params: Params, out: str | Path, *, progress: bool = True) -> BootstrapResult | None:
    """Train the wide teacher into ``out/models/teacher-wide`` (``None``, building nothing, when not embedded).

    Deterministic for one seed and one thread count (``task.num_threads``), like the default bootstrap.
    """
    if not params.models.embedded:
        return None
    t = params.task
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        out = Path(out)
        start = time.perf_counter()
        splits = make_task_splits(t.seed, t.num_train, t.num_val, t.num_eval)  # the default task's splits
        tokenizer = build_tokenizer()
        wide = wide_params(params)
        run = train_teacher(wide, tokenizer, splits, progress=progress)
        directory = out / WIDE_DIR
        sha = save_model_dir(wide, tokenizer, run.teacher_state, directory)
        result = BootstrapResult(
            seed=wide.task.seed,
            num_threads=torch.get_num_threads(),
            steps_run=run.steps_run,
            wall_time_s=round(time.perf_counter() - start, 2),
            teacher={
                "dir": str(directory),
                "step": run.teacher_step,
                "val_acc": run.teacher_val_acc,
                "manifest_sha256": sha,
                "architecture": params.models.tiny_wide.model_dump(),
            },
            student_base={},
            val_curve=run.val_curve,
            splits={"train": len(splits.train), "val": len(splits.val), "eval": len(splits.eval)},
        )
        (out / "bootstrap-wide.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        return result
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.bootstrap_wide", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="artifacts")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = run_bootstrap_wide(
            load_params(args.params, args.overrides), args.out, progress=not args.no_progress
        )
    except ConfigError as exc:
        print(f"bootstrap_wide: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(
            f"wide teacher: step {result.teacher['step']} val_acc {result.teacher['val_acc']:.3f} | "
            f"{result.steps_run} steps in {result.wall_time_s:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
