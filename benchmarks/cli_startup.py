"""Start-up time of the daily CLI commands (docs/registry.md "CLI start-up"), measured side by side in one run.

    python benchmarks/cli_startup.py --runs 10 --out benchmarks/cli-startup.json

Builds a scratch registry (SQLite) with one gated, promoted version whose MLflow mirror (a SQLite tracking store) is
up to date, as after a `dvc repro`, then runs each command ``--runs`` times in a fresh process (after one warm-up
run, so the page cache is warm as for a user's second command) and reports the median wall time and the median CPU
time (user + sys of the child). ``history`` goes through the in-process FastAPI app; ``status`` does not (it runs
the same query without the web framework), so the two rows show what the app costs at start-up. The load average
before and after is recorded: wall times on a shared machine are worse than on a quiet one, CPU times much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "oprd-student"
POLICY = {
    "suites": {
        "embedded": {"floor": 0.2, "non_inferiority_margin": 0.05, "max_teacher_gap": 0.8, "min_problems": 50}
    },
    "bootstrap": {"seed": 0, "n_resamples": 200},
}
COMMANDS = {
    "oprd-ci --help": ["--help"],
    "oprd-ci status oprd-student": ["status", MODEL],
    "oprd-ci status oprd-student --json": ["status", MODEL, "--json"],
    "oprd-ci history oprd-student": ["history", MODEL],
}


def _problems(scores: list[float]) -> list[dict]:
    return [
        {"problem_id": f"p{i}", "k": 4, "n_correct": round(s * 4), "mean_length": 20.0}
        for i, s in enumerate(scores)
    ]


def _scratch_registry(root: Path) -> dict[str, str]:
    """One promoted version of ``MODEL`` (the committed student base as its artifact), mirrored to MLflow."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    artifacts = root / "artifacts"
    shutil.copytree(REPO / "artifacts/models/student-base", artifacts / "student")
    env = {
        "OPRD_DATABASE_URL": f"sqlite:///{root}/registry.db",
        "OPRD_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "OPRD_ARTIFACT_ROOTS": str(artifacts),
    }
    settings = ServerSettings(database_url=env["OPRD_DATABASE_URL"], mlflow_tracking_uri=env["OPRD_MLFLOW_TRACKING_URI"],
                              artifact_roots=[artifacts])  # fmt: skip
    rng = random.Random(0)
    evidence = {
        "model": MODEL,
        "artifact_path": str(artifacts / "student"),
        "suites": {
            "embedded": {
                "candidate": _problems([float(rng.random() < 0.9) for _ in range(100)]),
                "teacher": _problems([1.0] * 100),
            }
        },
        "cost": {"device_hours": 0.1, "usd": 0.01},
        "lineage": {"teacher": "teacher@scratch", "mlflow_run_ids": {}},
    }
    with TestClient(create_app(settings, local_actor="bench", run_reconciler=False)) as c:
        c.put(f"/v1/models/{MODEL}/policy", json={"spec": POLICY, "reason": "bench"}).raise_for_status()
        r = c.post("/v1/gate", json=evidence)
        r.raise_for_status()
        assert r.json()["promoted"]["version"] == 1, r.json()
        assert c.post("/v1/reconcile").json()["pending"] == 0
    return env


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "oprd_ci", *argv], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"oprd-ci {' '.join(argv)} exited {code}: {proc.stderr.read().decode()[-500:]}")
    proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs per command (>= 1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be at least 1, got {args.runs}")
    with tempfile.TemporaryDirectory(prefix="oprd-cli-bench-") as tmp:
        root = Path(tmp)
        scratch = _scratch_registry(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPRD_", "MLFLOW_"))}
        env.update(scratch, PYTHONPATH=str(REPO))
        load_start = os.getloadavg()
        rows = []
        for label, cmd in COMMANDS.items():
            _time(cmd, env, root)  # warm-up
            samples = [_time(cmd, env, root) for _ in range(args.runs)]
            walls, cpus = [w for w, _ in samples], [c for _, c in samples]
            rows.append({"command": label, "runs": args.runs, "wall_s_median": statistics.median(walls),
                         "wall_s_min": min(walls), "cpu_s_median": statistics.median(cpus)})  # fmt: skip
        load_end = os.getloadavg()
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": load_start, "loadavg_end": load_end},
        "versions": {p: metadata.version(p) for p in ("typer", "fastapi", "sqlalchemy", "mlflow")},
        "rows": rows,
    }  # fmt: skip
    print(
        f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}, {os.cpu_count()} cores, {args.runs} runs each"
    )
    print("| command | wall s (median) | wall s (min) | CPU s (median) |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['command']}` | {r['wall_s_median']:.2f} | {r['wall_s_min']:.2f} | {r['cpu_s_median']:.2f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
