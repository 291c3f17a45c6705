"""Applies the outbox to MLflow, in order, from one background thread; detects and repairs alias drift.

Why an outbox: an alias move commits in the database (CAS + audit + outbox row in one transaction); MLflow
is written afterwards. If MLflow is down, rows stay pending (visible in ``/health`` and ``status``) and are
retried every ``interval_s``; nothing diverges silently. Superseded ``set_alias`` rows of the same
(model, alias) are collapsed: ``set_registered_model_alias`` is an upsert, so only the newest matters.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import func, select, text, update

from server.db import Database
from server.mlflow_mirror import MlflowMirror
from server.orm import Alias, OutboxItem, RegisteredModel, utcnow

log = logging.getLogger(__name__)
_BATCH = 500
_PG_LOCK_KEY = 0x0F0D_C1  # one reconciler at a time across replicas sharing a PostgreSQL database


@dataclass
class ReconcileResult:
    applied: int = 0
    pending: int = 0
    errors: list[str] = field(default_factory=list)
    drift_fixed: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, db: Database, mirror: MlflowMirror | None, interval_s: float) -> None:
        self.db, self.mirror, self.interval_s = db, mirror, interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._applied = threading.Condition()
        self._high_water = 0  # every outbox id <= this has been applied (or collapsed)
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="oprd-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def kick(self) -> None:
        self._wake.set()

    def wait_applied(self, outbox_id: int, timeout_s: float) -> bool:
        """Block until outbox row ``outbox_id`` is applied (True) or ``timeout_s`` passes (False)."""
        self.kick()
        with self._applied:
            return self._applied.wait_for(lambda: self._high_water >= outbox_id, timeout=timeout_s)

    def _loop(self) -> None:
        passes = 0
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.run_once(check_drift=passes % 10 == 0)
            except Exception as exc:  # the loop must survive a DB hiccup; the error is surfaced in status
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("reconcile pass failed")
            passes += 1

    # ----------------------------------------------------------------------------------- one pass
    def run_once(self, *, check_drift: bool = False) -> ReconcileResult:
        """Apply pending rows in id order until the first failure; optionally repair alias drift."""
        result = ReconcileResult()
        if self.mirror is None:
            result.pending = self.pending_count()
            return result
        with self._lock, self._cluster_lock() as acquired:
            if not acquired:
                return result
            self._apply_pending(result)
            if check_drift and not result.errors:
                self._repair_drift(result)
        result.pending = self.pending_count()
        return result

    def pending_count(self) -> int:
        with self.db.read() as s:
            return (
                s.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.applied_at.is_(None)))
                or 0
            )

    def _apply_pending(self, result: ReconcileResult) -> None:
        assert self.mirror is not None
        while True:
            with self.db.read() as s:
                rows = s.scalars(
                    select(OutboxItem)
                    .where(OutboxItem.applied_at.is_(None))
                    .order_by(OutboxItem.id)
                    .limit(_BATCH)
                ).all()
            if not rows:
                self._advance(self._max_id())
                return
            latest_alias = {(r.model_name, r.payload["alias"]): r.id for r in rows if r.kind == "set_alias"}
            done: list[int] = []
            for row in rows:
                superseded = (
                    row.kind == "set_alias" and latest_alias[(row.model_name, row.payload["alias"])] != row.id
                )
                if not superseded:
                    try:
                        self.mirror.apply(row.kind, row.model_name, row.payload)
                    except Exception as exc:
                        msg = f"outbox {row.id} ({row.kind} {row.model_name}): {type(exc).__name__}: {exc}"[
                            :2000
                        ]
                        self._mark(done, failed=(row.id, msg))
                        self.last_error = msg
                        result.errors.append(msg)
                        result.applied += len(done)
                        return
                done.append(row.id)
            self._mark(done)
            result.applied += len(done)
            self.last_error = None
            if len(rows) < _BATCH:
                self._advance(done[-1])
                return

    def _mark(self, done: list[int], failed: tuple[int, str] | None = None) -> None:
        def tx(s):  # type: ignore[no-untyped-def]
            if done:
                s.execute(update(OutboxItem).where(OutboxItem.id.in_(done)).values(applied_at=utcnow()))
            if failed is not None:
                s.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == failed[0])
                    .values(attempts=OutboxItem.attempts + 1, last_error=failed[1])
                )

        self.db.transact(tx)
        if done:
            self._advance(done[-1])

    def _max_id(self) -> int:
        with self.db.read() as s:
            pending_min = s.scalar(select(func.min(OutboxItem.id)).where(OutboxItem.applied_at.is_(None)))
            if pending_min is not None:
                return pending_min - 1
            return s.scalar(select(func.max(OutboxItem.id))) or 0

    def _advance(self, upto: int) -> None:
        with self._applied:
            if upto > self._high_water:
                self._high_water = upto
            self._applied.notify_all()

    def _repair_drift(self, result: ReconcileResult) -> None:
        assert self.mirror is not None
        with self.db.read() as s:
            rows = s.execute(select(RegisteredModel.name, Alias.alias, Alias.version).join(Alias)).all()
        by_model: dict[str, dict[str, int]] = {}
        for name, alias, version in rows:
            by_model.setdefault(name, {})[alias] = version
        for name, want in by_model.items():
            have = self.mirror.aliases(name)
            for alias, version in want.items():
                if have.get(alias) != version:
                    # Someone moved the alias in MLflow directly (or a write was lost): the DB wins.
                    self.mirror.apply("set_alias", name, {"alias": alias, "version": version})
                    result.drift_fixed.append(f"{name}@{alias}: MLflow {have.get(alias)} -> {version}")
                    log.warning("alias drift repaired: %s", result.drift_fixed[-1])

    # ----------------------------------------------------------------------------------- cluster lock
    class _NoLock:
        def __enter__(self) -> bool:
            return True

        def __exit__(self, *exc: object) -> None:
            return None

    def _cluster_lock(self):  # type: ignore[no-untyped-def]
        if self.db.is_sqlite:
            return self._NoLock()  # single node: the process lock is enough
        return _PgAdvisoryLock(self.db)


class _PgAdvisoryLock:
    def __init__(self, db: Database) -> None:
        self.db = db

    def __enter__(self) -> bool:
        self.conn = self.db.engine.connect()
        self.acquired = bool(
            self.conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK_KEY}).scalar()
        )
        return self.acquired

    def __exit__(self, *exc: object) -> None:
        if self.acquired:
            self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        self.conn.close()
