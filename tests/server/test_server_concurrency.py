"""R1/R2/DB1 (reliability.md): 32 concurrent clients x 50 mixed promote/rollback/gate ops against a live uvicorn
server on SQLite and on PostgreSQL, with a real MLflow store: 0 lost updates, 0 server errors, a gapless audit
log with one row per successful move, and MLflow aliases equal to the database afterwards."""

from __future__ import annotations

import pytest
from conftest import ADMIN, CI, LiveServer, server_env

from server import loadtest

CLIENTS, OPS = 32, 50


def _run_load(tmp_path, database_url=None):
    srv = LiveServer(server_env(tmp_path, database_url), tmp_path / "server.log")
    try:
        bodies = loadtest.prepare(srv.url, ADMIN, CI, "load", tmp_path / "artifacts", n_versions=5)
        report = loadtest.run(
            srv.url,
            admin=ADMIN,
            ci=CI,
            model="load",
            n_versions=5,
            clients=CLIENTS,
            ops_per_client=OPS,
            gate_every=10,
            gate_bodies=bodies,
        )
    finally:
        srv.stop()
    print("\n" + loadtest.format_table([(database_url.split(":")[0] if database_url else "sqlite", report)]))
    return report


def _assert_report(report: loadtest.Report) -> None:
    assert report.violations == []
    moves = [o for o in report.ops if o.kind in ("promote", "rollback")]
    assert len(moves) == CLIENTS * OPS * 9 // 10
    assert all(o.status in (200, 409) for o in moves), {o.status for o in moves}
    n_ok = sum(o.status == 200 for o in moves)
    assert n_ok > 50, "the load must actually move the alias many times"
    assert report.audit_moves == n_ok + 1  # + the initial gate promotion
    assert all(o.status == 200 for o in report.ops if o.kind == "gate")


def test_concurrent_promote_rollback_sqlite(tmp_path):
    _assert_report(_run_load(tmp_path))


@pytest.mark.postgres
def test_concurrent_promote_rollback_postgres(tmp_path, pg_fresh_url):
    _assert_report(_run_load(tmp_path, pg_fresh_url))
