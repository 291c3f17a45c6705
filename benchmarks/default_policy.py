"""The default policy on real evidence: the gate's own decision (``server.decision.decide``) under
``policies/default.yaml`` for the student base, weak students and good students, as first versions (no champion).

    python benchmarks/default_policy.py [--policy policies/default.yaml]

Evidence comes from committed measurements of the embedded task (500 held-out problems, k=4, the evaluate stage's
settings): ``metrics/eval.json`` (teacher, student base and the pipeline's 300-step oprd student) and
``benchmarks/methods/results.json`` (the methods grid: seed 0 of each method at its selected learning rate). Those
files keep per-suite means, not per-problem rows, so each role's rows are rebuilt with exactly the measured number
of correct samples (``avg_at_k x 500 x 4``, spread evenly over the problems) and its measured mean length. Every
criterion that applies to a first version (floor, teacher_gap, gap_closed, min_problems, the length and
device-hours caps) reads only those means and counts, so its verdict is the one the gate gives the real rows; the
champion-relative criteria (non-inferiority, ratios) are NOT_APPLICABLE without a champion. The 30-step smoke
student's score is the README's measured smoke run (21.1% Avg@4; no metrics file of it is committed).

Prints a markdown table: each student, its Avg@k, the gap share it closes, its verdict and the failing criteria,
and, for comparison, its verdict under the default policy before issue 19 (floor 0.20, max gap 0.80 only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.decision import decide  # noqa: E402
from server.policy import PolicySpec, load_policy_file  # noqa: E402
from server.schemas import EvidenceBody  # noqa: E402

SUITE = "embedded"
SMOKE_30_STEPS = 0.211
"""README, "Smoke run": the 30-step student of the release's smoke run measured 21.1% Avg@4 (same evaluate stage)."""
OLD_DEFAULT = {  # policies/default.yaml before issue 19: any student clearing the floor also cleared the gap
    "suites": {
        SUITE: {"floor": 0.20, "non_inferiority_margin": 0.05, "max_teacher_gap": 0.80, "min_problems": 50}
    },
    "length_tokens": {"max": 64, "max_ratio_to_champion": 1.5},
    "cost_usd": {"max_ratio_to_champion": 1.5},
    "device_hours": {"max": 24},
}


def rows(avg_at_k: float, n: int, k: int, mean_length: float, prefix: str) -> list[dict]:
    """``n`` problem rows with ``round(avg_at_k * n * k)`` correct samples in all, spread as evenly as possible."""
    total = round(avg_at_k * n * k)
    q, r = divmod(total, n)
    return [
        {
            "problem_id": f"{prefix}{i}",
            "k": k,
            "n_correct": q + (1 if i < r else 0),
            "mean_length": mean_length,
        }
        for i in range(n)
    ]


def evidence(cand: dict, teacher: dict, base: dict, device_hours: float) -> EvidenceBody:
    def role(m: dict) -> list[dict]:
        return rows(m["avg_at_k"], m["n_problems"], m["k"], m["mean_length"], "p")

    return EvidenceBody.model_validate(
        {
            "suites": {SUITE: {"candidate": role(cand), "teacher": role(teacher), "base": role(base)}},
            "cost": {"device_hours": device_hours, "usd": device_hours * 0.05},
        }
    )


def students() -> tuple[dict, dict, list[tuple[str, str, dict, float]]]:
    """(teacher, base, [(name, source, metrics, device_hours)]) from the committed files."""
    ev = json.loads((REPO / "metrics/eval.json").read_text())[SUITE]
    distill = json.loads((REPO / "metrics/distill.json").read_text())
    grid = json.loads((REPO / "benchmarks/methods/results.json").read_text())
    teacher, base = ev["teacher"], ev["student_base"]
    out = [("student base (untrained)", "metrics/eval.json", base, 0.0)]
    out.append(
        ("30-step oprd (smoke run)", "README smoke run", {**base, "avg_at_k": SMOKE_30_STEPS}, 0.0)
    )  # same eval settings and length as the base; only its Avg@k was recorded
    for method, info in sorted(
        grid["methods"].items(), key=lambda kv: kv[1]["seeds"]["student"]["0"]["avg_at_k"]
    ):
        cell = next(
            c for c in grid["cells"] if c["method"] == method and c["seed"] == 0 and c["lr"] == info["lr"]
        )
        hours = cell["distill"]["wall_seconds"] * cell["distill"]["world_size"] / 3600.0
        out.append(
            (f"300-step {method}, lr {info['lr']:g}", "methods grid, seed 0", cell["eval"]["student"], hours)
        )
    hours = distill["wall_seconds"] * distill["world_size"] / 3600.0
    out.append(("300-step oprd (pipeline)", "metrics/eval.json", ev["student"], hours))
    return teacher, base, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, default=REPO / "policies/default.yaml")
    args = ap.parse_args()
    policy, old = load_policy_file(args.policy), PolicySpec.model_validate(OLD_DEFAULT)
    teacher, base, cands = students()
    print(
        f"teacher {teacher['avg_at_k']:.4f}, student base {base['avg_at_k']:.4f} Avg@{teacher['k']} on "
        f"{teacher['n_problems']} problems; policy {args.policy.relative_to(REPO) if args.policy.is_relative_to(REPO) else args.policy}\n"
    )
    print("| student | evidence | Avg@k | gap closed | verdict | failing criteria | before issue 19 |")
    print("|---|---|---|---|---|---|---|")
    for name, source, m, hours in cands:
        ev = evidence(m, teacher, base, hours)
        verdict, criteria = decide(policy, ev, None)
        old_verdict, _ = decide(old, ev, None)
        failing = "; ".join(
            f"{c.criterion} {c.observed:.3f} vs {c.threshold:g}" if c.observed is not None else c.criterion
            for c in criteria
            if c.status == "FAIL"
        )
        closed = (m["avg_at_k"] - base["avg_at_k"]) / (teacher["avg_at_k"] - base["avg_at_k"])
        print(
            f"| {name} | {source} | {m['avg_at_k']:.3f} | {closed:.0%} | **{verdict}** | {failing or '-'} | {old_verdict} |"
        )


if __name__ == "__main__":
    main()
