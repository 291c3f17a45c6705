"""Engine and transaction handling for SQLite (embedded) and PostgreSQL.

SQLite: WAL, ``busy_timeout``, and ``BEGIN IMMEDIATE`` for every write transaction. pysqlite emits ``BEGIN``
lazily and deferred, so a transaction that reads and then writes can hit ``SQLITE_BUSY`` even with a busy
timeout; taking the write lock at ``BEGIN`` makes writers queue instead (reliability.md §6).

PostgreSQL: READ COMMITTED plus explicit row locks (``SELECT ... FOR UPDATE``) on the registered-model row,
which serialises writers of one model; serialization failures, deadlocks and unique violations raised by a
concurrent writer are retried with jitter (at most ``MAX_ATTEMPTS``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.settings import ServerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_ATTEMPTS = 6
_RETRY_SQLSTATES = {"40001", "40P01", "23505"}


class Database:
    """Owns the engine and hands out read sessions and retried write transactions."""

    def __init__(self, settings: ServerSettings) -> None:
        self.url = settings.database_url
        self.is_sqlite = self.url.startswith("sqlite")
        # SQLite has one writer. Writers of this process queue on a mutex first: a waiting BEGIN IMMEDIATE
        # polls with sqlite's busy-handler sleeps (up to 100 ms each), so under contention the lock sat idle
        # between holders and the wait alone reached ~1 s at p99; a mutex hands over at once. Other
        # processes (a CLI on the same file) still queue on the busy timeout.
        self._writer = threading.Lock() if self.url.startswith("sqlite") else contextlib.nullcontext()
        if self.is_sqlite:
            self.engine = _sqlite_engine(self.url, settings.sqlite_busy_timeout_ms, settings.db_pool_size)
            write_engine = self.engine.execution_options(oprd_immediate=True)
        else:
            self.engine = create_engine(
                self.url,
                pool_size=settings.db_pool_size,
                max_overflow=settings.db_pool_size,
                pool_pre_ping=True,
            )
            write_engine = self.engine
        self._read = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._write = sessionmaker(bind=write_engine, expire_on_commit=False)

    def read(self) -> Session:
        """A session for reads only (deferred transaction on SQLite)."""
        return self._read()

    def transact(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one write transaction and commit; retry transient conflicts.

        ``fn`` must be safe to re-run from scratch (it is, as long as it only touches the session).
        Exceptions that are not transient conflicts propagate after a rollback.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            session = self._write()
            try:
                with self._writer:
                    result = fn(session)
                    session.commit()
                return result
            except (OperationalError, IntegrityError, DBAPIError) as exc:
                session.rollback()
                if attempt == MAX_ATTEMPTS or not _is_transient(exc, self.is_sqlite):
                    raise
                log.info("transient DB conflict (attempt %d): %s", attempt, exc.orig)
                time.sleep(random.uniform(0.002, 0.02) * attempt)
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def _is_transient(exc: DBAPIError, is_sqlite: bool) -> bool:
    if is_sqlite:
        return "locked" in str(exc.orig) or "busy" in str(exc.orig)
    return getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES


def _sqlite_engine(url: str, busy_timeout_ms: int, pool_size: int) -> Engine:
    # A pool as large as the worker threads that use it: connections past the pool were opened and closed per
    # request, each paying the PRAGMAs below.
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        pool_size=pool_size,
        max_overflow=2 * pool_size,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's begin event emit BEGIN itself (pysqlite would otherwise emit a deferred BEGIN).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get("oprd_immediate") else "BEGIN"
        )

    return engine
