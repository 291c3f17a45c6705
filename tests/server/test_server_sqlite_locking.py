"""DB1: read-then-write transactions on SQLite. Through ``Database.transact`` (BEGIN IMMEDIATE + busy timeout)
no update is lost and no 'database is locked' escapes; the negative control with deferred BEGIN and a short
timeout reproduces SQLITE_BUSY, which shows the test can fail."""

from __future__ import annotations

import sqlite3
import threading

from sqlalchemy import text

from server.db import Database
from server.settings import ServerSettings

THREADS, TXNS = 8, 40


def _hammer(fn) -> list[Exception]:
    errors: list[Exception] = []

    def worker():
        for _ in range(TXNS):
            try:
                fn()
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_begin_immediate_loses_no_update(tmp_path):
    db = Database(ServerSettings(database_url=f"sqlite:///{tmp_path}/c.db", mlflow_enabled=False))
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE counter (n INTEGER)"))
        conn.execute(text("INSERT INTO counter VALUES (0)"))

    def incr():
        def tx(s):
            n = s.execute(text("SELECT n FROM counter")).scalar_one()
            s.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})

        db.transact(tx)

    assert _hammer(incr) == []
    with db.read() as s:
        assert s.execute(text("SELECT n FROM counter")).scalar_one() == THREADS * TXNS
    db.dispose()


def test_negative_control_deferred_begin_hits_sqlite_busy(tmp_path):
    path = tmp_path / "d.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE counter (n INTEGER)")
        conn.execute("INSERT INTO counter VALUES (0)")

    def incr():
        conn = sqlite3.connect(path, timeout=0.05, isolation_level=None)
        try:
            conn.execute("BEGIN")  # deferred: takes the write lock only at the UPDATE
            n = conn.execute("SELECT n FROM counter").fetchone()[0]
            conn.execute("UPDATE counter SET n = ?", (n + 1,))
            conn.execute("COMMIT")
        except sqlite3.OperationalError:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    errors = _hammer(incr)
    assert any("locked" in str(e) or "busy" in str(e) for e in errors)
