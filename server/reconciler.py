"""Applies the outbox to MLflow, in order, from one applier at a time; detects and repairs alias drift.

Why an outbox: an alias move commits in the database (CAS + audit + outbox row in one transaction); MLflow
is written afterwards. If MLflow is down, rows stay pending (visible in ``/health`` and ``status``) and are
retried every ``interval_s``; nothing diverges silently. Superseded ``set_alias`` rows of the same
(model, alias) are collapsed: ``set_registered_model_alias`` is an upsert, so only the newest matters.

A row MLflow *refuses* (an answer, not an outage: invalid source, missing version, a divergent version
number) is parked: it gets ``parked_at``, an ``mlflow_parked`` audit event on its model, and counts in
``/health`` and ``status``; the rows after it are still applied, so one bad row cannot stop mirroring for
every model.

Several processes (``oprd-ci serve --workers N`` on PostgreSQL) each run a reconciler; a PostgreSQL advisory
lock makes one of them the applier for a pass. A process that finds the lock taken retries shortly, so a
request's rows are applied by whichever process holds it; requests wait on the database, not on an
in-process counter (``wait_mirrored``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

from sqlalchemy import func, select, text, update

from server.db import Database
from server.mlflow_mirror import MirrorDivergence, MlflowMirror, mlflow_error_code
from server.orm import Alias, AuditEvent, OutboxItem, RegisteredModel, utcnow
from server.registry import next_audit_seq

log = logging.getLogger(__name__)
_BATCH = 500
_PG_LOCK_KEY = 0x0F0D_C1  # one applier at a time across processes sharing a PostgreSQL database
_LOCK_RETRY_S = 0.02
_POLL_S = 0.03
_SETTLED_KEEP = 100_000
# MLflow error codes that are the server's answer about this write (retrying cannot change it).
_REFUSALS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
SYSTEM_ACTOR = "system:reconciler"


def _pending(q):  # type: ignore[no-untyped-def]
    return q.where(OutboxItem.applied_at.is_(None), OutboxItem.parked_at.is_(None))


def is_refusal(exc: BaseException) -> bool:
    """True when MLflow answered and refused the write (park it), False for outages (retry it)."""
    if isinstance(exc, MirrorDivergence):
        return True
    return mlflow_error_code(exc) in _REFUSALS


@dataclass
class ReconcileResult:
    applied: int = 0
    pending: int = 0
    parked: int = 0
    errors: list[str] = field(default_factory=list)
    drift_fixed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutboxStats:
    """Counts read from the database at the end of the last pass (what ``/health`` reports without a query)."""

    pending: int = 0
    parked: int = 0
    last_error: str | None = None
    at: float = 0.0


class Reconciler:
    def __init__(self, db: Database, mirror: MlflowMirror | None, interval_s: float) -> None:
        self.db, self.mirror, self.interval_s = db, mirror, interval_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._applied = threading.Condition()
        self._thread: threading.Thread | None = None
        self._settled: OrderedDict[int, str] = OrderedDict()  # outbox id -> applied|parked, newest last
        self.last_error: str | None = None
        self.stats = OutboxStats()
        self.refresh_stats()

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

    def wait_mirrored(self, outbox_ids: list[int], timeout_s: float) -> str:
        """Wait up to ``timeout_s`` for these outbox rows (and only these) to leave the pending state.

        Returns ``"applied"``, ``"parked"`` (MLflow refused one of them) or ``"pending"`` (not done in time,
        or mirroring is off). Rows this process settles wake the waiter at once (no database reads); rows
        another process settles (several workers on PostgreSQL) are seen by polling the database every
        ``_POLL_S`` (and once at the deadline, on SQLite too).
        """
        if self.mirror is None or not outbox_ids:
            return "pending" if outbox_ids else "applied"
        self.kick()
        deadline = time.monotonic() + timeout_s
        poll_db = not self.db.is_sqlite
        while True:
            with self._applied:
                states = [self._settled.get(i) for i in outbox_ids]
                if all(states):
                    return "parked" if "parked" in states else "applied"
                left = deadline - time.monotonic()
                if left > 0:
                    self._applied.wait(min(left, _POLL_S) if poll_db else left)
            if left <= 0 or poll_db:
                state = self._settled_in_db(outbox_ids)
                if left <= 0 or state != "pending":
                    return state

    def _settled_in_db(self, outbox_ids: list[int]) -> str:
        with self.db.read() as s:
            rows = s.execute(
                select(OutboxItem.applied_at, OutboxItem.parked_at).where(OutboxItem.id.in_(outbox_ids))
            ).all()
        if all(a is not None or p is not None for a, p in rows):
            return "parked" if any(p is not None for _, p in rows) else "applied"
        return "pending"

    def _loop(self) -> None:
        passes = 0
        if self.mirror is not None:
            try:  # open the MLflow stores now (a sqlite store migrates on first use), not in a request
                self.mirror.aliases("oprd-warm-up")
            except Exception as exc:
                log.info("MLflow warm-up failed: %s", exc)
        retry_soon = False
        while not self._stop.is_set():
            self._wake.wait(_LOCK_RETRY_S if retry_soon else self.interval_s)
            kicked = self._wake.is_set()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                result = self.run_once(check_drift=passes % 10 == 0)
                # Another process holds the applier lock: it may be finishing a pass that started before the
                # rows a request here is waiting for, so look again shortly rather than after interval_s.
                retry_soon = kicked and result.skipped and result.pending > 0
            except Exception as exc:  # the loop must survive a DB hiccup; the error is surfaced in status
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("reconcile pass failed")
                retry_soon = False
            passes += 1

    # ----------------------------------------------------------------------------------- one pass
    def run_once(self, *, check_drift: bool = False, models: Collection[str] | None = None) -> _PassResult:
        """Apply pending rows in id order (parking refused ones) until an outage; optionally repair drift (of
        ``models`` only, when given; pending rows of every model are applied, in order)."""
        result = _PassResult()
        if self.mirror is not None:
            with self._lock, self._cluster_lock() as acquired:
                if acquired:
                    self._apply_pending(result)
                    if check_drift and not result.outage:
                        self._repair_drift(result, models)
                else:
                    result.skipped = True
        stats = self.refresh_stats()
        result.pending, result.parked = stats.pending, stats.parked
        return result

    def refresh_stats(self) -> OutboxStats:
        with self.db.read() as s:
            pending = s.scalar(_pending(select(func.count()).select_from(OutboxItem))) or 0
            parked = (
                s.scalar(
                    select(func.count()).select_from(OutboxItem).where(OutboxItem.parked_at.is_not(None))
                )
                or 0
            )
            oldest_error = s.scalar(
                select(OutboxItem.last_error)
                .where(OutboxItem.applied_at.is_(None), OutboxItem.last_error.is_not(None))
                .order_by(OutboxItem.id)
                .limit(1)
            )
        self.stats = OutboxStats(
            pending=pending, parked=parked, last_error=self.last_error or oldest_error, at=time.time()
        )
        return self.stats

    def pending_count(self) -> int:
        return self.refresh_stats().pending

    def _apply_pending(self, result: ReconcileResult) -> None:
        assert self.mirror is not None
        while True:
            with self.db.read() as s:
                rows = s.scalars(_pending(select(OutboxItem)).order_by(OutboxItem.id).limit(_BATCH)).all()
            if not rows:
                return
            latest_alias = {(r.model_name, r.payload["alias"]): r.id for r in rows if r.kind == "set_alias"}
            done: list[int] = []
            parked: list[tuple[OutboxItem, str]] = []
            for row in rows:
                superseded = (
                    row.kind == "set_alias" and latest_alias[(row.model_name, row.payload["alias"])] != row.id
                )
                if superseded:
                    done.append(row.id)
                    continue
                try:
                    self.mirror.apply(row.kind, row.model_name, row.payload)
                except Exception as exc:
                    msg = f"outbox {row.id} ({row.kind} {row.model_name}): {type(exc).__name__}: {exc}"[:2000]
                    if is_refusal(exc):
                        parked.append((row, msg))
                        result.errors.append(f"parked {msg}")
                        log.error("MLflow refused a write; parked: %s", msg)
                        continue
                    self._mark(done, parked, failed=(row.id, msg))
                    self.last_error = msg
                    result.outage = True
                    result.errors.append(msg)
                    result.applied += len(done)
                    return
                done.append(row.id)
            self._mark(done, parked)
            result.applied += len(done)
            self.last_error = None
            if len(rows) < _BATCH:
                return

    def _mark(
        self, done: list[int], parked: list[tuple[OutboxItem, str]], failed: tuple[int, str] | None = None
    ) -> None:
        def tx(s):  # type: ignore[no-untyped-def]
            if done:
                s.execute(update(OutboxItem).where(OutboxItem.id.in_(done)).values(applied_at=utcnow()))
            for row, msg in parked:
                s.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == row.id)
                    .values(parked_at=utcnow(), attempts=OutboxItem.attempts + 1, last_error=msg)
                )
                model = s.scalar(
                    select(RegisteredModel).where(RegisteredModel.name == row.model_name).with_for_update()
                )
                if model is not None:  # the audit says what MLflow does not have, and why
                    s.add(
                        AuditEvent(
                            model_id=model.id,
                            seq=next_audit_seq(model),
                            action="mlflow_parked",
                            alias=row.payload.get("alias"),
                            to_version=row.payload.get("version"),
                            actor=SYSTEM_ACTOR,
                            role="admin",
                            reason=msg,
                        )
                    )
            if failed is not None:
                s.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id == failed[0])
                    .values(attempts=OutboxItem.attempts + 1, last_error=failed[1])
                )

        if done or parked or failed:
            self.db.transact(tx)
        with self._applied:
            self._settled.update((i, "applied") for i in done)
            self._settled.update((row.id, "parked") for row, _ in parked)
            while len(self._settled) > _SETTLED_KEEP:
                self._settled.popitem(last=False)
            self._applied.notify_all()

    def _repair_drift(self, result: ReconcileResult, models: Collection[str] | None = None) -> None:
        """Make MLflow's aliases equal the database's, skipping models with writes not yet applied or parked:
        there MLflow is behind by design, not drifted (the applier lock is held, so nothing is applied while
        this runs and the snapshot below stays consistent with MLflow)."""
        assert self.mirror is not None
        with self.db.read() as s:
            rows = s.execute(select(RegisteredModel.name, Alias.alias, Alias.version).join(Alias)).all()
            unsettled = set(
                s.scalars(select(OutboxItem.model_name).where(OutboxItem.applied_at.is_(None)).distinct())
            )
        by_model: dict[str, dict[str, int]] = {}
        for name, alias, version in rows:
            if name not in unsettled and (models is None or name in models):
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
            return self._NoLock()  # single process on SQLite (serve refuses --workers > 1 there)
        return _PgAdvisoryLock(self.db)


@dataclass
class _PassResult(ReconcileResult):
    skipped: bool = False
    """Another process held the applier lock; nothing was applied by this one."""
    outage: bool = False
    """A write failed for a reason other than MLflow refusing it (unreachable, 5xx): the pass stopped there."""


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
