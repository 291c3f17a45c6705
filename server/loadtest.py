"""Concurrent promote/rollback/gate load against a live registry, with the reliability checks and latencies.

Used by ``tests/server/test_server_concurrency.py`` (which asserts the checks) and runnable by hand to
produce the throughput and latency tables of docs/registry.md::

    python -m server.loadtest --database-url sqlite:///$PWD/tmp/load.db
    python -m server.loadtest --database-url postgresql+psycopg://postgres@127.0.0.1:5432/oprd_load \
        --clients 1,8,32 --json benchmarks/registry-load.json [--profile]

(the command starts its own uvicorn + a sqlite MLflow store in a temporary directory, and runs each client count
against a fresh model; give it an empty database). ``--profile`` serves with the timing hooks of
``server.load_profile`` and prints where each request kind spends its time.

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
    wall_s: float = 0.0
    """Duration of the load phase (first request to last answer), without the MLflow drain afterwards."""

    def latency_ms(self, kind: str, ok_only: bool = True) -> tuple[float, float, int]:
        p = self.percentiles_ms(kind, ok_only)
        return p["p50"], p["p99"], p["n"]

    def percentiles_ms(self, kind: str, ok_only: bool = True) -> dict[str, Any]:
        """n, p50, p95, p99 (nearest rank, ms) of ``kind`` (``"move"`` = promote + rollback); 2xx only by default."""
        kinds = ("promote", "rollback") if kind == "move" else (kind,)
        xs = sorted(
            o.latency_s * 1000 for o in self.ops if o.kind in kinds and (o.status < 300 or not ok_only)
        )
        if not xs:
            return {"n": 0, "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        at = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        return {"n": len(xs), "p50": statistics.median(xs), "p95": at(0.95), "p99": at(0.99)}

    def throughput(self) -> dict[str, float]:
        """Per second of load: successful moves, gates, and all promote/rollback/gate answers (409s included)."""
        wall = self.wall_s or float("nan")
        main = [o for o in self.ops if o.kind in ("promote", "rollback", "gate")]
        return {
            "moves_per_s": sum(o.kind != "gate" and o.status == 200 for o in main) / wall,
            "gates_per_s": sum(o.kind == "gate" and o.status == 200 for o in main) / wall,
            "ops_per_s": len(main) / wall,
            "all_requests_per_s": len(self.ops) / wall,
        }


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
            if r.status_code != 200:
                raise RuntimeError(f"status answered {r.status_code}: {r.text[:500]}")
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
    t_start = time.perf_counter()
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
    report = Report(ops=ops, wall_s=time.perf_counter() - t_start)
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


def format_load_table(rows: list[tuple[int, Report]]) -> str:
    """Throughput and latency per client count (latencies of 2xx answers; 409 = a lost compare-and-set)."""
    lines = [
        "| clients | moves/s | gates/s | ops/s (incl. 409) | operation | n 2xx | n 409 | n 5xx | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for clients, rep in rows:
        t = rep.throughput()
        for kind in ("gate", "promote", "rollback"):
            p = rep.percentiles_ms(kind)
            n409 = sum(o.kind == kind and o.status == 409 for o in rep.ops)
            n5xx = sum(o.kind == kind and o.status >= 500 for o in rep.ops)
            head = (
                f"| {clients} | {t['moves_per_s']:.1f} | {t['gates_per_s']:.1f} | {t['ops_per_s']:.1f}"
                if kind == "gate"
                else "| | | |"
            )
            lines.append(
                f"{head} | {kind} | {p['n']} | {n409} | {n5xx} | {p['p50']:.1f} | {p['p95']:.1f} | {p['p99']:.1f} |"
            )
    return "\n".join(lines)


def _versions(database_url: str) -> dict[str, str]:
    """Commit, Python and library versions and the database server's version, for the benchmark record."""
    import platform
    import subprocess
    from importlib.metadata import version

    from sqlalchemy import create_engine, text

    def pkg(name: str) -> str:
        try:
            return version(name)
        except Exception:  # not installed
            return "-"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "server"], capture_output=True, text=True
        )
        commit += "+dirty" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            db = (
                "SQLite " + conn.exec_driver_sql("select sqlite_version()").scalar()
                if database_url.startswith("sqlite")
                else conn.execute(text("select version()")).scalar().split(" on ")[0]
            )
    finally:
        engine.dispose()
    return {
        "commit": commit,
        "python": platform.python_version(),
        "sqlalchemy": pkg("sqlalchemy"),
        "fastapi": pkg("fastapi"),
        "uvicorn": pkg("uvicorn"),
        "psycopg": pkg("psycopg"),
        "mlflow": pkg("mlflow"),
        "database": db,
    }


def _client_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return counts


def main() -> None:  # pragma: no cover - exercised by hand for the docs/registry.md numbers
    import os
    import platform
    import secrets
    import subprocess
    import sys
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", required=True)
    ap.add_argument(
        "--clients", type=_client_counts, default=[1, 8, 32], help="client counts, e.g. 1,8,32 (one run each)"
    )
    ap.add_argument("--ops", type=int, default=50, help="operations per client")
    ap.add_argument("--gate-every", type=int, default=10)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (PostgreSQL only)")
    ap.add_argument(
        "--json", type=Path, help="also write the results here (e.g. benchmarks/registry-load.json)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="serve with timing hooks (server.load_profile) and print where each request kind spends its time",
    )
    args = ap.parse_args()
    if args.workers > 1 and args.database_url.startswith("sqlite"):
        ap.error("--workers > 1 needs PostgreSQL")
    if args.profile and args.workers > 1:
        ap.error("--profile needs --workers 1")
    versions = _versions(args.database_url)
    db_label = f"{args.database_url.split(':')[0].split('+')[0]} x{args.workers}"
    runs: list[tuple[int, Report, tuple[float, float]]] = []
    profile: dict[str, Any] = {}
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
        profile_out = root / "profile.json"
        serve = (
            [
                "-c",
                f"from server.load_profile import serve_profiled; serve_profiled({args.port}, {str(profile_out)!r})",
            ]
            if args.profile
            else [
                *("-m", "uvicorn", "--factory", "server.app:app_from_env", "--port", str(args.port)),
                *("--log-level", "warning", "--workers", str(args.workers)),
            ]
        )
        proc = subprocess.Popen([sys.executable, *serve], env=env)
        url = f"http://127.0.0.1:{args.port}"
        run_id = secrets.token_hex(3)  # a fresh model per run: the database may hold earlier runs
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/health", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if proc.poll() is not None:
                        raise SystemExit(f"the server exited with {proc.returncode}") from None
                    time.sleep(0.1)
            for clients in args.clients:
                model = f"load-{run_id}-c{clients}"
                bodies = prepare(url, "load-admin", "load-ci", model, root / model, 5)
                load_start = os.getloadavg()[0]
                rep = run(
                    url,
                    admin="load-admin",
                    ci="load-ci",
                    model=model,
                    n_versions=5,
                    clients=clients,
                    ops_per_client=args.ops,
                    gate_every=args.gate_every,
                    gate_bodies=bodies,
                )
                runs.append((clients, rep, (load_start, os.getloadavg()[0])))
                print(
                    f"{clients} clients done: {rep.wall_s:.1f} s, violations: {rep.violations or 'none'}",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait()
        if args.profile and profile_out.exists():
            from server.load_profile import format_breakdown, summarize

            profile = summarize(json.loads(profile_out.read_text()))

    print(f"\n{db_label}, {args.ops} ops per client, every {args.gate_every}th a gate")
    print(format_load_table([(c, r) for c, r, _ in runs]))
    for clients, rep, (l0, l1) in runs:
        n5xx = sum(o.status >= 500 for o in rep.ops)
        pending = sum(o.mlflow_pending for o in rep.ops)
        print(
            f"{clients} clients: violations: {rep.violations or 'none'}; 5xx: {n5xx}; final revision "
            f"{rep.final_revision}; audit moves {rep.audit_moves}; answers marked 'MLflow pending': {pending}; "
            f"load average {l0:.2f} -> {l1:.2f}"
        )
    if profile:
        print("\nper-request breakdown (mean ms; profiled server, all client counts together):")
        print(format_breakdown(profile))
    cmd = "python -m server.loadtest " + " ".join(sys.argv[1:])
    print(f"{os.cpu_count()} CPUs; {versions}; command: {cmd}")
    if args.json:
        record = {
            "command": cmd,
            "database": db_label,
            "ops_per_client": args.ops,
            "gate_every": args.gate_every,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            **versions,
            "runs": [
                {
                    "clients": clients,
                    "load_average_start": l0,
                    "load_average_end": l1,
                    "wall_s": rep.wall_s,
                    "throughput": rep.throughput(),
                    "latency_ms": {k: rep.percentiles_ms(k) for k in ("gate", "promote", "rollback", "move")},
                    "status_counts": {
                        k: {
                            str(code): sum(o.kind == k and o.status == code for o in rep.ops)
                            for code in sorted({o.status for o in rep.ops if o.kind == k})
                        }
                        for k in ("gate", "promote", "rollback", "status")
                    },
                    "mlflow_pending_answers": sum(o.mlflow_pending for o in rep.ops),
                    "violations": rep.violations,
                }
                for clients, rep, (l0, l1) in runs
            ],
            "profile_ms": profile or None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if any(rep.violations for _, rep, _ in runs):
        raise SystemExit("reliability violations (above)")


if __name__ == "__main__":
    main()
