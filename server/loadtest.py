"""Concurrent promote/rollback/gate load against a live registry, with the reliability checks and latencies.

Used by ``tests/server/test_server_concurrency.py`` (which asserts the checks) and runnable by hand to
produce the latency table of docs/registry.md::

    python -m server.loadtest --database-url sqlite:///$PWD/tmp/load.db
    python -m server.loadtest --database-url postgresql+psycopg://postgres@127.0.0.1:5432/oprd_load

(the command starts its own uvicorn + a sqlite MLflow store in a temporary directory).

Each client repeats: with the alias revision it last saw, promote a random other version or roll back
(50/50), re-reading the status after a 409; every ``gate_every``-th op submits a gate decision instead.
Checks: no 5xx; every successful move's ``expected_revision`` + 1 equals its new revision and the new
revisions are exactly 1..final (no lost update, no duplicate); the audit log is gapless and holds exactly one
row per successful move; MLflow's alias equals the database's after the reconciler drains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.artifacts import listing_sha256

POLICY = {
    "suites": {
        "embedded": {"floor": 0.2, "non_inferiority_margin": 0.05, "max_teacher_gap": 0.9, "min_problems": 50}
    },
    "length_tokens": {"max": 64, "max_ratio_to_champion": 1.5},
    "cost_usd": {"max_ratio_to_champion": 1.5},
    "bootstrap": {"seed": 0, "n_resamples": 2000},
}


@dataclass
class Op:
    kind: str  # promote | rollback | gate | status
    status: int
    latency_s: float
    expected: int | None = None
    revision: int | None = None
    mlflow_pending: bool = False
    """The answer came before its MLflow writes were applied (``OPRD-MLflow`` header)."""


@dataclass
class Report:
    ops: list[Op]
    violations: list[str] = field(default_factory=list)
    final_revision: int = 0
    audit_moves: int = 0

    def latency_ms(self, kind: str, ok_only: bool = True) -> tuple[float, float, int]:
        xs = sorted(
            o.latency_s * 1000 for o in self.ops if o.kind == kind and (o.status < 300 or not ok_only)
        )
        if not xs:
            return float("nan"), float("nan"), 0
        return statistics.median(xs), xs[min(len(xs) - 1, int(0.99 * len(xs)))], len(xs)


def write_artifact(root: Path, name: str) -> Path:
    """A tiny model-like directory with a contracts.md manifest."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": b'{"hidden_size": 8}',
        "model.safetensors": hashlib.sha256(name.encode()).digest() * 32,
    }
    hashes = {}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    (d / "manifest.json").write_text(json.dumps({"files": hashes, "sha256": listing_sha256(hashes)}))
    return d


def gate_body(model: str, artifact: Path, n: int = 60) -> dict[str, Any]:
    rng = random.Random(7)  # identical per-problem results for every version: every decision is PROMOTE
    cand = [
        {"problem_id": f"p{i}", "k": 4, "n_correct": rng.randint(1, 4), "mean_length": 20.0} for i in range(n)
    ]
    teacher = [{"problem_id": f"p{i}", "k": 4, "n_correct": 4, "mean_length": 20.0} for i in range(n)]
    return {
        "model": model,
        "artifact_path": str(artifact),
        "suites": {"embedded": {"candidate": cand, "teacher": teacher}},
        "cost": {"device_hours": 0.1, "usd": 0.01},
        "lineage": {"teacher": "teacher@load"},
    }


def prepare(url: str, admin: str, ci: str, model: str, artifact_root: Path, n_versions: int) -> list[dict]:
    """Install the policy and gate ``n_versions`` versions (v1 becomes champion). Returns the gate bodies."""
    bodies = []
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.put(
            f"/v1/models/{model}/policy",
            json={"spec": POLICY, "reason": "load test"},
            headers={"Authorization": f"Bearer {admin}"},
        )
        r.raise_for_status()
        for v in range(1, n_versions + 1):
            body = gate_body(model, write_artifact(artifact_root, f"{model}-v{v}"))
            r = c.post(
                "/v1/gate", json=body, params={"promote": v == 1}, headers={"Authorization": f"Bearer {ci}"}
            )
            r.raise_for_status()
            assert r.json()["decision"]["verdict"] == "PROMOTE", r.json()["decision"]
            bodies.append(body)
    return bodies


def _client_loop(
    url: str,
    token: str,
    model: str,
    n_versions: int,
    n_ops: int,
    seed: int,
    gate_bodies: list[dict],
    gate_every: int,
) -> list[Op]:
    rng = random.Random(seed)
    ops: list[Op] = []
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=120, headers=h) as c:

        def read() -> tuple[int, int]:
            t0 = time.perf_counter()
            r = c.get(f"/v1/models/{model}/status", params={"mlflow": "false"})
            ops.append(Op("status", r.status_code, time.perf_counter() - t0))
            a = next(a for a in r.json()["aliases"] if a["alias"] == "champion")
            return a["revision"], a["version"]

        rev, cur = read()
        for i in range(n_ops):
            if gate_every and i % gate_every == gate_every - 1:
                t0 = time.perf_counter()
                r = c.post("/v1/gate", json=rng.choice(gate_bodies), params={"promote": "false"})
                ops.append(Op("gate", r.status_code, time.perf_counter() - t0))
                continue
            if rng.random() < 0.5:
                kind = "promote"
                target = rng.choice([v for v in range(1, n_versions + 1) if v != cur])
                path, body = (
                    "promote",
                    {"version": target, "expected_revision": rev, "reason": f"load {seed}/{i}"},
                )
            else:
                kind, path, body = (
                    "rollback",
                    "rollback",
                    {"expected_revision": rev, "reason": f"load {seed}/{i}"},
                )
            t0 = time.perf_counter()
            r = c.post(
                f"/v1/models/{model}/aliases/champion/{path}",
                json=body,
                headers={"Idempotency-Key": f"{seed}-{i}"},
            )
            op = Op(
                kind,
                r.status_code,
                time.perf_counter() - t0,
                expected=rev,
                mlflow_pending=r.headers.get("OPRD-MLflow") is not None,
            )
            ops.append(op)
            if r.status_code == 200:
                op.revision, cur = r.json()["revision"], r.json()["version"]
                rev = op.revision
            else:
                rev, cur = read()
    return ops


def run(
    url: str,
    *,
    admin: str,
    ci: str,
    model: str,
    n_versions: int,
    clients: int,
    ops_per_client: int,
    gate_every: int,
    gate_bodies: list[dict],
    seed: int = 0,
) -> Report:
    """Drive the load, wait for the reconciler, and check the invariants listed in the module docstring."""
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(
                _client_loop,
                url,
                ci,
                model,
                n_versions,
                ops_per_client,
                seed * 1000 + k,
                gate_bodies,
                gate_every,
            )
            for k in range(clients)
        ]
        ops = [op for f in futures for op in f.result()]
    report = Report(ops=ops)
    report.violations += [f"{o.kind} answered {o.status}" for o in ops if o.status >= 500]
    moves = [o for o in ops if o.kind in ("promote", "rollback") and o.status == 200]
    report.violations += [
        f"CAS chain broken: expected {o.expected} -> revision {o.revision}"
        for o in moves
        if o.revision != (o.expected or 0) + 1
    ]
    revisions = sorted(o.revision for o in moves if o.revision is not None)
    admin_h = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, timeout=120, headers=admin_h) as c:
        history = c.get(f"/v1/models/{model}/history", params={"limit": 100_000}).json()
        deadline = time.monotonic() + 60
        while True:
            rec = c.post("/v1/reconcile").json()
            status = c.get(f"/v1/models/{model}/status").json()
            if rec["pending"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    champ = next(a for a in status["aliases"] if a["alias"] == "champion")
    report.final_revision = champ["revision"]
    # revision 1 was the initial gate promotion, made before the load
    if revisions != list(range(2, champ["revision"] + 1)):
        report.violations.append(
            f"lost or duplicated updates: {len(revisions)} successes, final revision {champ['revision']}"
        )
    if [e["seq"] for e in history] != list(range(1, len(history) + 1)):
        report.violations.append("audit seq is not gapless")
    alias_moves = [e for e in history if e["alias"] == "champion"]
    report.audit_moves = len(alias_moves)
    if [e["alias_revision"] for e in alias_moves] != list(range(1, champ["revision"] + 1)):
        report.violations.append("audit rows do not match alias revisions one to one")
    if alias_moves and alias_moves[-1]["to_version"] != champ["version"]:
        report.violations.append("last audit row does not point at the alias version")
    if status["pending_mlflow_writes"] != 0 or status["mlflow_aliases"] != {"champion": champ["version"]}:
        report.violations.append(
            f"MLflow differs: {status['mlflow_aliases']} vs DB v{champ['version']} ({status['pending_mlflow_writes']} pending)"
        )
    return report


def format_table(rows: list[tuple[str, Report]]) -> str:
    lines = ["| database | operation | n (2xx) | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for db, rep in rows:
        for kind in ("gate", "promote", "rollback"):
            p50, p99, n = rep.latency_ms(kind)
            lines.append(f"| {db} | {kind} | {n} | {p50:.1f} | {p99:.1f} |")
    return "\n".join(lines)


def main() -> None:  # pragma: no cover - exercised by hand for the docs/registry.md numbers
    import os
    import subprocess
    import sys
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--ops", type=int, default=50)
    ap.add_argument("--gate-every", type=int, default=10)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (PostgreSQL only)")
    args = ap.parse_args()
    if args.workers > 1 and args.database_url.startswith("sqlite"):
        ap.error("--workers > 1 needs PostgreSQL")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.workers > 1:  # as `oprd-ci serve --workers` does: schemas once, before the workers race
            from server.app import prepare_for_workers
            from server.settings import ServerSettings

            prepare_for_workers(
                ServerSettings(
                    database_url=args.database_url,
                    mlflow_tracking_uri=f"sqlite:///{root}/mlflow.db",
                    tokens="admin:admin:load-admin,ci:ci:load-ci",
                )
            )
        env = {
            **os.environ,
            "OPRD_DATABASE_URL": args.database_url,
            "OPRD_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
            "OPRD_ARTIFACT_ROOTS": str(root),
            "OPRD_TOKENS": "admin:admin:load-admin,ci:ci:load-ci",
        }
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "server.app:app_from_env",
                "--port",
                str(args.port),
                "--log-level",
                "warning",
                "--workers",
                str(args.workers),
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(url + "/health", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            bodies = prepare(url, "load-admin", "load-ci", "load", root, 5)
            rep = run(
                url,
                admin="load-admin",
                ci="load-ci",
                model="load",
                n_versions=5,
                clients=args.clients,
                ops_per_client=args.ops,
                gate_every=args.gate_every,
                gate_bodies=bodies,
            )
        finally:
            proc.terminate()
            proc.wait()
    import platform

    print(format_table([(f"{args.database_url.split(':')[0].split('+')[0]} x{args.workers}", rep)]))
    n5xx = sum(o.status >= 500 for o in rep.ops)
    pending = sum(o.mlflow_pending for o in rep.ops)
    print(
        f"violations: {rep.violations or 'none'}; 5xx: {n5xx}; final revision {rep.final_revision}; "
        f"audit moves {rep.audit_moves}; answers marked 'MLflow pending': {pending}"
    )
    print(
        f"clients {args.clients} x ops {args.ops}, workers {args.workers}; load average at start "
        f"{load_start[0]:.2f} / end {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
