"""The failure-bank cycle's results file, from the run's own outputs (benchmarks/failure_bank_cycle.sh).

    python benchmarks/failure_bank_report.py benchmarks/failure-bank/run --out benchmarks/failure-bank-toolcall.json

Reads the snapshots the script takes after each step (``cycle0/``, ``collect/``, ``cycle1/``: ``metrics/eval.json``,
``metrics/distill.json``, ``metrics/gate.json``, ``artifacts/gate/decision.json``, registry status), the bank summary
(``bank.json``), the collected failures file and ``timings.tsv``; no number is typed by hand. Also records the
machine (CPU, cores, load average at start and end), torch/transformers versions and the commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _avg(tree: dict, suite: str, role: str) -> dict[str, Any] | None:
    m = (tree or {}).get(suite, {}).get(role)
    return (
        None
        if m is None
        else {k: m[k] for k in ("avg_at_k", "avg_at_k_ci95", "pass_at_k", "n_problems", "k")}
    )


def _decision(d: dict | None) -> dict[str, Any] | None:
    if d is None:
        return None
    dec = d["decision"]
    return {
        "model": dec["model"],
        "version": dec["version"],
        "verdict": dec["verdict"],
        "champion_version": dec["champion_version"],
        "policy_version": dec["policy_version"],
        "alias_moved": bool(d.get("promoted")),
        "criteria": [
            {k: c[k] for k in ("criterion", "suite", "status", "observed", "threshold", "detail")}
            for c in dec["criteria"]
        ],
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def stage_seconds(root: Path = Path(".")) -> list[dict[str, Any]]:
    """Every MLflow stage run of the local store (``mlflow.db``, experiment ``oprd-ci``) in start order: its name
    (stage, method or verdict, commit) and wall seconds (start to end, as MLflow recorded them)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{(root / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("oprd-ci")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [
        {"run": r.info.run_name, "seconds": round((r.info.end_time - r.info.start_time) / 1000, 1)}
        for r in runs
        if r.info.end_time
    ]


def share_at_least(per_problem: Path, threshold: float = 0.5) -> dict[str, dict[str, list[int]]]:
    """``{suite: {role: [problems with Avg@k >= threshold, problems]}}`` from a ``per_problem.jsonl`` snapshot:
    how often a model "fixes" a request by the policy's default ``fixed_min_avg_at_k``."""
    out: dict[str, dict[str, list[int]]] = {}
    if not per_problem.is_file():
        return out
    for line in per_problem.read_text().splitlines():
        r = json.loads(line)
        cell = out.setdefault(r["suite"], {}).setdefault(r["role"], [0, 0])
        cell[0] += r["n_correct"] / r["k"] >= threshold
        cell[1] += 1
    return out


def build(run: Path) -> dict[str, Any]:
    c0, col, c1 = run / "cycle0", run / "collect", run / "cycle1"
    e0, ec, e1 = _json(c0 / "eval.json"), _json(col / "eval.json"), _json(c1 / "eval.json")
    d1 = _json(c1 / "decision.json")
    fixed = [c for c in d1["decision"]["criteria"] if c["criterion"] == "fixed_failures"] if d1 else []
    bank = _json(run / "bank.json")
    timings = {
        row["step"]: float(row["seconds"])
        for row in csv.DictReader((run / "timings.tsv").open(), delimiter="\t")
    }
    import torch
    import transformers

    from trainer.config import load_params

    params = load_params("params.yaml")

    return {
        "task": "toolcall",
        "setting": {  # params.yaml as the run left it (cycle 1; cycle 0 differs in gate.policy only)
            "method": params.distill.method,
            "lr": params.optim.lr,
            "steps": params.distill.steps,
            "task": params.task.name,
            "evaluate_k": params.evaluate.k,
            "failures": params.failures.model_dump(),
            "policy_cycle0": "policies/toolcall.yaml",
            "policy_cycle1": params.gate.policy,
        },
        "cycle0": {
            "distill": _json(c0 / "distill.json"),
            "eval_toolcall": {r: _avg(e0, "toolcall", r) for r in ("teacher", "student_base", "student")},
            "decision": _decision(_json(c0 / "decision.json")),
            "promote_override": _json(c0 / "promote.json"),
            "champion_after": (_json(c0 / "status.json") or {}).get("champion"),
        },
        "collect": {
            "suite": "traffic",
            "requests": (ec or {}).get("traffic", {}).get("student", {}).get("n_problems"),
            "champion_on_traffic": _avg(ec, "traffic", "student"),
            "failed_below_avg_at_k": 0.5,
        },
        "bank": bank,
        "cycle1": {
            "distill": _json(c1 / "distill.json"),
            "eval_toolcall": {r: _avg(e1, "toolcall", r) for r in ("teacher", "student_base", "student")},
            "eval_regression": {
                r: _avg(e1, "toolcall-traffic", r) for r in ("champion", "student", "student_final")
            },
            "champion_scored": _json(c1 / "champion.json"),
            "decision": _decision(d1),
            "fixes": [c["detail"] for c in fixed],
            "avg_at_k_at_least_0.5": share_at_least(c1 / "per_problem.jsonl"),
            "champion_after": (_json(c1 / "status.json") or {}).get("champion"),
        },
        "wall_seconds": timings,
        "stage_run_seconds": stage_seconds(),
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "loadavg_start": (run / "loadavg-start.txt").read_text().strip()
            if (run / "loadavg-start.txt").is_file()
            else None,
            "loadavg_end": (run / "loadavg-end.txt").read_text().strip()
            if (run / "loadavg-end.txt").is_file()
            else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "commit": subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the script's snapshot folder (benchmarks/failure-bank/run)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = build(args.run)
    # The registry stores absolute artifact paths; the committed record keeps them repo-relative.
    text = json.dumps(result, indent=2).replace(str(Path.cwd().resolve()) + "/", "")
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")
    for line in result["cycle1"]["fixes"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
