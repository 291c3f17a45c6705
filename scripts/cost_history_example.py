"""Build the example registry of docs/cost.md "Cost over time" and print ``oprd-ci history --cost`` for it.

    python scripts/cost_history_example.py [--keep DIR]

Every decision is made by the real registry (``oprd-ci gate`` in-process on a fresh SQLite database, MLflow
mirroring off) under ``policies/default.yaml`` plus ``cost_usd.max_ratio_to_recent_median: 1.3``. The evidence of
each version is one recorded cell of the arithmetic methods grid (``benchmarks/methods/results.json``): its final
Avg@4 on the 500 eval problems, its mean response length and its distill wall-clock (cost = wall-seconds / 3600 x
0.05 USD per device-hour, the params default). The grid records aggregates only, so the per-problem rows are
synthesized to have exactly that Avg@4 (problem i gets n_correct so the total matches; same layout for every
version) and the teacher is the recorded 95.3%. The artifacts are placeholder directories with real manifests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "oprd-student"
PRICE = 0.05
CELLS = [  # the order of the example's "nightly" versions
    "g-oprd-lr3e-04-s0",
    "g-oprd-lr1e-03-s0",
    "g-oprd-lr3e-03-s0",
    "g-opdtopk-lr3e-04-s0",
    "g-oprd-lr3e-03-s2",
    "g-oprd-lr3e-03-s1",
]


def _rows(avg: float, length: float, n: int = 500, k: int = 4) -> list[dict]:
    total = round(avg * n * k)
    base, extra = divmod(total, n)
    return [
        {
            "problem_id": f"p{i}",
            "k": k,
            "n_correct": min(k, base + (1 if i < extra else 0)),
            "mean_length": length,
        }
        for i in range(n)
    ]


def _artifact(root: Path, name: str) -> Path:
    from server.artifacts import listing_sha256

    d = root / name
    d.mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": name.encode() * 64}
    for rel, b in files.items():
        (d / rel).write_bytes(b)
    hashes = {rel: hashlib.sha256(b).hexdigest() for rel, b in files.items()}
    (d / "manifest.json").write_text(json.dumps({"files": hashes, "sha256": listing_sha256(hashes)}))
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="Build the registry here (default: a temporary directory).")
    args = ap.parse_args()
    cells = {
        c["name"]: c for c in json.loads((REPO / "benchmarks/methods/results.json").read_text())["cells"]
    }
    work = args.keep or Path(tempfile.mkdtemp(prefix="oprd-cost-example-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPRD_DATABASE_URL": f"sqlite:///{work}/registry.db", "OPRD_MLFLOW_ENABLED": "false",
           "OPRD_ARTIFACT_ROOTS": str(work / "artifacts"), "PYTHONPATH": str(REPO)}  # fmt: skip
    env.pop("OPRD_REGISTRY_URL", None)
    policy = yaml.safe_load((REPO / "policies/default.yaml").read_text())
    policy["cost_usd"]["max_ratio_to_recent_median"] = 1.3
    (work / "policy.yaml").write_text(yaml.safe_dump(policy))
    teacher = _rows(0.953, 29.6)
    for i, name in enumerate(CELLS, start=1):
        cell = cells[name]
        ev = cell["eval"]["student_final"]
        hours = cell["distill"]["wall_seconds"] / 3600.0
        evidence = {
            "model": MODEL,
            "artifact_path": str(_artifact(work / "artifacts", name)),
            "suites": {
                "embedded": {"candidate": _rows(ev["avg_at_k"], ev["mean_length"]), "teacher": teacher}
            },
            "cost": {"device_hours": hours, "usd": hours * PRICE},
            "lineage": {"teacher": "teacher@example"},
        }
        f = work / f"evidence-v{i}.json"
        f.write_text(json.dumps(evidence))
        cmd = [sys.executable, "-m", "oprd_ci", "gate", "--evidence", str(f), "--policy", str(work / "policy.yaml"),
               "--install-policy", "--policy-reason", "cost example", "--reason", f"grid cell {name}"]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    shown = subprocess.run([sys.executable, "-m", "oprd_ci", "history", MODEL, "--cost"], env=env, check=True,
                           capture_output=True, text=True)  # fmt: skip
    print(shown.stdout, end="")
    print(f"registry: {work}/registry.db", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
