"""Fresh tool-call requests outside the committed splits: stand-in "production traffic" for the tool-call task.

    python -m pipelines.toolcall_requests --seed 1 --num 400 --out failures/incoming/toolcall-traffic-s1.jsonl

Draws ``--num`` distinct problems from :func:`pipelines.task_toolcall.iter_problems` with ``--seed`` (the task's
templates, another stream than the bootstrap's ``task.toolcall.seed``), leaving out every prompt of the task
directory's ``train``/``val``/``eval`` splits, so the file is held out from what the students train, select and are
gated on. Rows are suite rows (``{"id", "prompt", "grader", "reference"}``; ids ``req-s<seed>-<index>``), readable
by ``evaluate.suites`` as a file suite. The same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from pipelines.bootstrap_toolcall import GRADER
from pipelines.task_toolcall import iter_problems

__all__ = ["main", "split_prompts", "write_requests"]

SPLITS = ("train", "val", "eval")


def split_prompts(task_dir: str | Path) -> set[str]:
    """Every prompt of ``task_dir/{train,val,eval}.jsonl`` (a missing split is an error: the exclusion would be
    silently incomplete)."""
    prompts: set[str] = set()
    for name in SPLITS:
        path = Path(task_dir) / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the requests must exclude every split of the task")
        prompts.update(json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip())
    return prompts


def write_requests(seed: int, num: int, out: str | Path, exclude: set[str]) -> int:
    """Write ``num`` distinct requests not in ``exclude`` to ``out`` (JSONL); returns the number written."""
    if num <= 0:
        raise ValueError(f"--num must be > 0, got {num}")
    seen = set(exclude)
    rows = []
    for problem in itertools.islice(iter_problems(seed, frozenset(exclude)), 100 * num):
        if problem.prompt in seen:  # iter_problems may repeat a prompt it drew before
            continue
        seen.add(problem.prompt)
        rows.append({"id": f"req-s{seed}-{len(rows):05d}", "prompt": problem.prompt, "grader": GRADER,
                     "reference": problem.reference})  # fmt: skip
        if len(rows) == num:
            break
    if len(rows) < num:
        raise ValueError(f"only {len(rows)} distinct new requests in {100 * num} draws (asked for {num})")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fresh tool-call requests outside the task's committed splits.")
    ap.add_argument("--seed", type=int, required=True, help="generator seed (not the bootstrap's task seed)")
    ap.add_argument("--num", type=int, required=True, help="number of distinct requests")
    ap.add_argument("--out", required=True, help="output JSONL (suite rows)")
    ap.add_argument("--task-dir", default="artifacts/toolcall/task", help="splits to exclude")
    args = ap.parse_args(argv)
    try:
        n = write_requests(args.seed, args.num, args.out, split_prompts(args.task_dir))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} requests (seed {args.seed}, none in {args.task_dir}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
