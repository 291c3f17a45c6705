"""Where a request of the registry spends its time: a per-request breakdown for ``python -m server.loadtest --profile``.

``serve_profiled`` runs the registry app under uvicorn in this process with timing hooks installed, and when the
server stops (SIGTERM) writes one JSON object per request kind (``promote``, ``rollback``, ``gate``, ``status``)
to a file. Each request's wall time (from the ASGI call to the last body byte sent, milliseconds) is split into:

* ``sql``: time inside DB-API ``execute`` of statements without a row lock (count in ``sql_n``);
* ``lock``: statements that take or wait for a lock (``SELECT ... FOR UPDATE``, SQLite ``BEGIN IMMEDIATE``), plus
  the wait for this process's SQLite writer mutex (count in ``lock_n``);
* ``commit``: the database COMMIT or ROLLBACK, read transactions included (the final flush's statements are
  counted as ``sql``);
* ``mlflow_wait``: ``Reconciler.wait_mirrored`` (the bounded wait for this request's own MLflow writes);
* ``hash``: artifact hashing (``verify_artifact``) and the request fingerprint;
* ``decide``: the decision engine (bootstrap);
* ``json``: encoding the response (``jsonable_encoder`` and ``JSONResponse.render``);
* ``other``: the rest (HTTP parsing, pydantic validation of the request, ORM bookkeeping, thread hand-offs and
  waiting for the GIL or a CPU: on a loaded machine mostly the latter).

The hooks wrap functions and SQLAlchemy events of the real code; nothing is replaced. Timing adds a few
microseconds per statement, so profiled latencies are slightly higher than unprofiled ones.
"""

from __future__ import annotations

import contextvars
import json
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

SECTIONS = ("sql", "lock", "commit", "mlflow_wait", "hash", "decide", "json", "other")
_CTX: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("oprd_profile", default=None)


def _kind(method: str, path: str) -> str | None:
    if method == "POST" and path.endswith("/promote"):
        return "promote"
    if method == "POST" and path.endswith("/rollback"):
        return "rollback"
    if method == "POST" and path == "/v1/gate":
        return "gate"
    if method == "GET" and path.endswith("/status"):
        return "status"
    return None


class Collector:
    """Accumulates finished requests: kind -> list of {section: ms, ..., "total": ms, "status": code}."""

    def __init__(self) -> None:
        self.requests: dict[str, list[dict[str, float]]] = defaultdict(list)
        self._mutex = threading.Lock()

    def add(self, kind: str, rec: dict[str, float]) -> None:
        with self._mutex:
            self.requests[kind].append(rec)


def _add(key: str, dt_s: float, count_key: str | None = None) -> None:
    rec = _CTX.get()
    if rec is not None:
        rec[key] = rec.get(key, 0.0) + dt_s * 1000
        if count_key:
            rec[count_key] = rec.get(count_key, 0.0) + 1


def _timed(fn, key: str):  # type: ignore[no-untyped-def]
    """``fn`` with its wall time added to ``key``, less what sections nested in it recorded (the MLflow wait's
    polls of the outbox count as SQL, not twice): the sections are exclusive and add up to the total."""

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        rec = _CTX.get()
        nested0 = _nested_ms(rec, key)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            _add(key, max(0.0, dt - (_nested_ms(rec, key) - nested0) / 1000))

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _nested_ms(rec: dict[str, float] | None, key: str) -> float:
    return sum(v for k, v in rec.items() if k in SECTIONS and k != key) if rec is not None else 0.0


class _TimedLock:
    """The SQLite writer mutex, timing how long acquiring it waits."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __enter__(self) -> None:
        t0 = time.perf_counter()
        self._inner.__enter__()
        _add("lock", time.perf_counter() - t0)

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


def install(app: Any, collector: Collector) -> Any:
    """Install the hooks on the modules and on ``app``'s engine; returns the ASGI app to serve."""
    from fastapi.responses import JSONResponse
    from sqlalchemy import event

    from server import gating, idempotency, reconciler, registry

    registry.verify_artifact = _timed(registry.verify_artifact, "hash")
    gating.verify_artifact = _timed(gating.verify_artifact, "hash")
    gating.decide = _timed(gating.decide, "decide")
    idempotency.request_fingerprint = _timed(idempotency.request_fingerprint, "hash")
    idempotency.jsonable_encoder = _timed(idempotency.jsonable_encoder, "json")
    JSONResponse.render = _timed(JSONResponse.render, "json")  # type: ignore[method-assign]
    reconciler.Reconciler.wait_mirrored = _timed(reconciler.Reconciler.wait_mirrored, "mlflow_wait")  # type: ignore[method-assign]
    db = app.state.db
    if db.is_sqlite:
        db._writer = _TimedLock(db._writer)
    engine = db.engine

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        conn.info.setdefault("oprd_t0", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        dt = time.perf_counter() - conn.info["oprd_t0"].pop()
        locking = "FOR UPDATE" in statement or statement.startswith("BEGIN IMMEDIATE")
        _add("lock" if locking else "sql", dt, "lock_n" if locking else "sql_n")

    # SQLAlchemy has no after-commit event at the connection level: time the dialect's DB-API commit.
    dialect = engine.dialect
    dialect.do_commit = _timed(dialect.do_commit, "commit")  # type: ignore[method-assign]
    dialect.do_rollback = _timed(dialect.do_rollback, "commit")  # type: ignore[method-assign]

    async def profiled(scope, receive, send):  # type: ignore[no-untyped-def]
        kind = _kind(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None:
            return await app(scope, receive, send)
        rec: dict[str, float] = {}
        token = _CTX.set(rec)
        t0 = time.perf_counter()
        status = 0

        async def send_wrapper(message):  # type: ignore[no-untyped-def]
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            _CTX.reset(token)
            rec["total"] = (time.perf_counter() - t0) * 1000
            rec["status"] = status
            collector.add(kind, rec)

    return profiled


def serve_profiled(port: int, out: str) -> None:
    """Serve ``server.app:app_from_env`` on 127.0.0.1:``port`` with the hooks; on shutdown write the requests."""
    import uvicorn

    from server.app import app_from_env

    collector = Collector()
    app = app_from_env()
    asgi = install(app, collector)
    # lifespan events go to the FastAPI app (start/stop of the reconciler) through the wrapper unchanged
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    # uvicorn re-raises the SIGTERM it caught after its shutdown, under the handler it found: make that a no-op
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        Path(out).write_text(json.dumps(collector.requests))


def summarize(requests: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per kind and outcome (``ok`` = 2xx, ``409``): n and the mean of every section in ms (``other`` = the rest)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, recs in sorted(requests.items()):
        for outcome, sel in (
            ("ok", [r for r in recs if 200 <= r["status"] < 300]),
            ("409", [r for r in recs if r["status"] == 409]),
        ):
            if not sel:
                continue
            n = len(sel)
            row: dict[str, Any] = {"n": n}
            for key in ("total", "sql_n", "lock_n", *SECTIONS[:-1]):
                row[key] = sum(r.get(key, 0.0) for r in sel) / n
            row["other"] = row["total"] - sum(row[k] for k in SECTIONS[:-1])
            out[f"{kind} {outcome}"] = row
    return out


def format_breakdown(summary: dict[str, dict[str, Any]]) -> str:
    head = "| request | n | total ms | SQL stmts / ms | lock stmts / ms | commit/rollback | MLflow wait | hash | decide | JSON | other |"
    lines = [head, "|" + "---|" * 11]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['n']} | {r['total']:.1f} | {r['sql_n']:.1f} / {r['sql']:.1f} | "
            f"{r['lock_n']:.1f} / {r['lock']:.1f} | {r['commit']:.1f} | {r['mlflow_wait']:.1f} | {r['hash']:.1f} | "
            f"{r['decide']:.1f} | {r['json']:.1f} | {r['other']:.1f} |"
        )
    return "\n".join(lines)
