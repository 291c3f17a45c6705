"""DVC stage ``evaluate``: score the teacher, the student base and the distilled student on every suite.

    python -m pipelines.stage_evaluate --params params.yaml

Writes ``metrics/eval.json`` ``{suite: {role: metrics}}``, ``artifacts/eval/per_problem.jsonl`` (paired
comparisons; the gate's evidence) and ``artifacts/eval/responses.jsonl``. Each role is evaluated with the same
seed, so the three models see the same sampling stream.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pipelines.evaluation import evaluate_model, write_eval_outputs
from pipelines.stage_distill import STUDENT_DIR
from pipelines.suites import SuiteFormatError
from trainer.config import ConfigError, Params, load_params

METRICS = Path("metrics/eval.json")


def model_dirs(params: Params) -> dict[str, Path]:
    return {
        "teacher": Path(params.models.teacher.path),
        "student_base": Path(params.models.student.path),
        "student": STUDENT_DIR,
    }


def run(params_path: str, overrides: list[str]) -> dict:
    params = load_params(params_path, overrides)
    if params.optim.num_threads:
        torch.set_num_threads(params.optim.num_threads)
    t0 = time.perf_counter()
    results = {}
    for role, path in model_dirs(params).items():
        results[role] = evaluate_model(path, params.evaluate.suites, params.evaluate, role)
    tree = write_eval_outputs(results, METRICS)
    return {"tree": tree, "wall_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DVC stage: evaluation")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        out = run(args.params, args.overrides)
    except (ConfigError, FileNotFoundError, SuiteFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for suite, roles in out["tree"].items():
        for role, m in roles.items():
            print(f"{suite:>10} {role:>13}: avg@k {m['avg_at_k']:.3f}  len {m['mean_length']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
