"""Applies the outbox to MLflow from one applier at a time; detects and repairs alias drift.

Why an outbox: an alias move commits in the database (CAS + audit + outbox row in one transaction); MLflow
is written afterwards. If MLflow is down, rows stay pending (visible in ``/health`` and ``status``) and are
retried; nothing diverges silently.

Faults (docs/registry.md "MLflow writes that fail: retry, park, admin commands"):

* **A pass is bounded.** ``RetryPolicy.pass_deadline_s`` bounds a whole pass and ``call_timeout_s`` one MLflow
  call; a call that gets no answer (connection refused, timeout) ends the pass (MLflow is unreachable: trying
  the next row would only wait again). Nothing a request waits on is held across an MLflow call: requests wait
  on the database (``wait_mirrored``); ``POST /v1/reconcile`` does not queue behind a running pass
  (``run_once(wait=False)``).
* **Failures are classified** (:func:`classify`): *unreachable* and *transient* (408/429/502/503/504,
  ``TEMPORARILY_UNAVAILABLE``, ``REQUEST_LIMIT_EXCEEDED``) are retried with per-row exponential backoff
  (``next_attempt_at``) and parked once the row has failed for ``retry_budget_s``; *internal* (500,
  ``INTERNAL_ERROR``, anything unknown) is retried ``internal_error_attempts`` times, then parked; *refused*
  (any other 4xx / MLflow answer, a version-number divergence) is parked at once.
* **Poison never blocks the queue.** A failed row waits for its own next attempt; the rows after it are still
  applied. Order is kept only where it matters: a ``set_alias``/``set_version_tag`` row is superseded by a later
  row for the same alias/tag (also a parked one), and a row that names version N waits while N's
  ``create_version`` is still pending. A parked row gets an ``mlflow_parked`` audit event on its model and
  counts in ``/health`` and ``status`` until an admin retries or drops it (:func:`retry_parked`,
  :func:`drop_parked`). Drift repair skips only the aliases a parked row concerns, not the whole model.

Several processes (``oprd-ci serve --workers N`` on PostgreSQL) each run a reconciler; a PostgreSQL advisory
lock makes one of them the applier for a pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from server.db import Database
from server.errors import Conflict, NotFound
from server.mlflow_mirror import MirrorDivergence, MlflowHttpError, MlflowMirror, mlflow_error_code
from server.orm import Alias, AuditEvent, OutboxItem, RegisteredModel, utcnow
from server.registry import next_audit_seq

if TYPE_CHECKING:
    from server.settings import ServerSettings

log = logging.getLogger(__name__)
_BATCH = 500
_PG_LOCK_KEY = 0x0F0D_C1  # one applier at a time across processes sharing a PostgreSQL database
_LOCK_RETRY_S = 0.02
_POLL_S = 0.03
_SETTLED_KEEP = 100_000
SYSTEM_ACTOR = "system:reconciler"

UNREACHABLE, TRANSIENT, INTERNAL, REFUSED = "unreachable", "transient", "internal", "refused"
_TRANSIENT_STATUS = {408, 429, 502, 503, 504}
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
_INTERNAL_CODES = {"INTERNAL_ERROR"}


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, MlflowHttpError):
        return exc.status
    getter = getattr(exc, "get_http_status_code", None)  # MlflowException
    try:
        return int(getter()) if callable(getter) else None
    except Exception:
        return None


def classify(exc: BaseException) -> str:
    """The failure class of one MLflow write: ``unreachable`` (no answer: end the pass, retry the row later),
    ``transient`` (answered "not now": retry later), ``internal`` (a server error: retry a few times, then
    park), ``refused`` (MLflow's answer about this write: park now)."""
    if isinstance(exc, MirrorDivergence):
        return REFUSED
    if isinstance(exc, (httpx.TransportError, OSError, TimeoutError)):
        return UNREACHABLE
    code, status = mlflow_error_code(exc), _http_status(exc)
    if code in _TRANSIENT_CODES or (code is None and status in _TRANSIENT_STATUS):
        return TRANSIENT
    if code in _INTERNAL_CODES or (status is not None and status >= 500 and status not in _TRANSIENT_STATUS):
        return INTERNAL
    if code is not None or (status is not None and 400 <= status < 500):
        return REFUSED
    return INTERNAL  # an unknown exception: retried a few times, never forever


def is_refusal(exc: BaseException) -> bool:
    """True when MLflow answered and refused the write (park it at once)."""
    return classify(exc) == REFUSED


@dataclass(frozen=True)
class RetryPolicy:
    """How the applier treats failing MLflow writes (seconds throughout)."""

    pass_deadline_s: float = 10.0
    """Bound on one whole pass (apply + drift check); rows left over wait for the next pass."""
    call_timeout_s: float = 5.0
    """Bound on one MLflow call (each REST request to a tracking server)."""
    backoff_base_s: float = 1.0
    """A row that failed n times is not tried again for ``min(backoff_base_s * 2**(n-1), backoff_max_s)``."""
    backoff_max_s: float = 300.0
    internal_error_attempts: int = 3
    """A row that got a server error (500 / ``INTERNAL_ERROR`` / unknown) this many times is parked."""
    retry_budget_s: float = 86_400.0
    """A row still failing (unreachable / transient) this long after its first failure is parked."""
    pending_grace_s: float = 30.0
    """``/health`` says ``degraded`` when a write has been pending longer than this."""

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> RetryPolicy:
        return cls(
            pass_deadline_s=settings.reconcile_pass_deadline_s,
            call_timeout_s=settings.mlflow_write_timeout_s,
            backoff_base_s=settings.mlflow_retry_base_s,
            backoff_max_s=settings.mlflow_retry_max_s,
            internal_error_attempts=settings.mlflow_internal_error_attempts,
            retry_budget_s=settings.mlflow_retry_budget_s,
            pending_grace_s=settings.mlflow_pending_grace_s,
        )

    def backoff(self, attempts: int) -> timedelta:
        return timedelta(seconds=min(self.backoff_base_s * 2 ** max(0, attempts - 1), self.backoff_max_s))


def _pending(q):  # type: ignore[no-untyped-def]
    return q.where(OutboxItem.applied_at.is_(None), OutboxItem.parked_at.is_(None))


def _parked(q):  # type: ignore[no-untyped-def]
    return q.where(OutboxItem.applied_at.is_(None), OutboxItem.parked_at.is_not(None))


@dataclass
class ReconcileResult:
    applied: int = 0
    pending: int = 0
    parked: int = 0
    errors: list[str] = field(default_factory=list)
    drift_fixed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutboxStats:
    """The outbox as the database holds it (read by :func:`outbox_stats`, never by waiting for a pass)."""

    pending: int = 0
    parked: int = 0
    failing: int = 0
    """Pending rows whose last attempt failed (waiting for their next attempt)."""
    oldest_pending_at: datetime | None = None
    """``created_at`` (UTC, naive) of the oldest pending row."""
    last_error: str | None = None
    at: float = 0.0
    """``time.time()`` when these were read."""

    def oldest_pending_age_s(self) -> float | None:
        if self.oldest_pending_at is None:
            return None
        return round(max(0.0, (utcnow() - self.oldest_pending_at).total_seconds()), 3)

    def state(self, grace_s: float) -> str:
        """``degraded`` while writes are parked, failing, or pending longer than ``grace_s``; else ``ok``."""
        age = self.oldest_pending_age_s()
        if self.parked or self.failing or (age is not None and age > grace_s):
            return "degraded"
        return "ok"


def outbox_stats(db: Database) -> OutboxStats:
    """Counts, the oldest pending write and the root-cause error, in one short read transaction."""
    with db.read() as s:
        return read_outbox_stats(s)


def read_outbox_stats(s: Session) -> OutboxStats:
    """:func:`outbox_stats` inside the caller's transaction (``/health`` reads it with the webhook counts)."""
    pending, oldest = s.execute(
        _pending(select(func.count(), func.min(OutboxItem.created_at)).select_from(OutboxItem))
    ).one()
    failing = (
        s.scalar(
            _pending(select(func.count()).select_from(OutboxItem)).where(OutboxItem.last_error.is_not(None))
        )
        or 0
    )
    parked = s.scalar(_parked(select(func.count()).select_from(OutboxItem))) or 0
    oldest_error = s.scalar(
        select(OutboxItem.last_error)
        .where(OutboxItem.applied_at.is_(None), OutboxItem.last_error.is_not(None))
        .order_by(OutboxItem.id)
        .limit(1)
    )
    return OutboxStats(
        pending=pending or 0,
        parked=parked,
        failing=failing,
        oldest_pending_at=oldest,
        last_error=oldest_error,
        at=time.time(),
    )


class Reconciler:
    def __init__(
        self, db: Database, mirror: MlflowMirror | None, interval_s: float, retry: RetryPolicy | None = None
    ) -> None:
        self.db, self.mirror, self.interval_s = db, mirror, interval_s
        self.retry = retry or RetryPolicy()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._applied = threading.Condition()
        self._thread: threading.Thread | None = None
        self._settled: OrderedDict[int, str] = OrderedDict()  # outbox id -> applied|parked, newest last
        self.last_error: str | None = None
        self.pass_started: float | None = None
        """``time.time()`` when the running pass started; ``None`` between passes."""
        self.stats = OutboxStats()
        self.refresh_stats()

    @classmethod
    def from_settings(cls, db: Database, settings: ServerSettings) -> Reconciler:
        mirror = (
            MlflowMirror(settings.mlflow_tracking_uri, timeout_s=settings.mlflow_write_timeout_s)
            if settings.mlflow_enabled
            else None
        )
        return cls(db, mirror, settings.reconcile_interval_s, RetryPolicy.from_settings(settings))

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="oprd-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.retry.pass_deadline_s + self.retry.call_timeout_s + 5)

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
            return "parked" if any(a is None and p is not None for a, p in rows) else "applied"
        return "pending"

    def _loop(self) -> None:
        passes = 0
        if self.mirror is not None:
            try:  # open the MLflow stores now (a sqlite store migrates on first use), not in a request
                self.mirror.aliases_bounded("oprd-warm-up", self.retry.call_timeout_s)
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
    def run_once(
        self,
        *,
        check_drift: bool = False,
        models: Collection[str] | None = None,
        wait: bool | float = True,
        now: bool = False,
    ) -> _PassResult:
        """Apply the pending rows that are due (see the module docstring), within ``retry.pass_deadline_s``;
        optionally repair drift (of ``models`` only, when given). ``wait=False``: when a pass is already running
        in this process, return at once with ``busy`` set instead of waiting for it (a number: wait at most that many
        seconds for it first). ``now``: try backing-off rows
        too (an admin's ``reconcile``: "MLflow is back, apply now"); parked rows still need ``outbox retry``."""
        result = _PassResult()
        if self.mirror is not None:
            acquired = (
                self._lock.acquire(timeout=float(wait))
                if not isinstance(wait, bool)
                else self._lock.acquire(blocking=wait)
            )
            if not acquired:
                result.busy = result.skipped = True
            else:
                try:
                    self._one_pass(result, check_drift, models, now)
                finally:
                    self.pass_started = None
                    self._lock.release()
        stats = self.refresh_stats()
        result.pending, result.parked = stats.pending, stats.parked
        return result

    def _one_pass(
        self, result: _PassResult, check_drift: bool, models: Collection[str] | None, ignore_backoff: bool
    ) -> None:
        with self._cluster_lock() as acquired:
            if not acquired:
                result.skipped = True
                return
            assert self.mirror is not None
            try:
                self.mirror.open_local_store()
            except Exception as exc:  # an unusable local store: the rows' own attempts report it
                log.info("MLflow store not opened: %s", exc)
            self.pass_started = time.time()
            deadline = time.monotonic() + self.retry.pass_deadline_s
            self._apply_pending(result, deadline, ignore_backoff)
            # Only "MLflow does not answer" skips the drift check: a row that fails or backs off must not turn
            # drift repair off for every model (it skips that row's model itself).
            if check_drift and not result.unreachable and time.monotonic() < deadline:
                self._repair_drift(result, models, deadline)

    def refresh_stats(self) -> OutboxStats:
        stats = outbox_stats(self.db)
        self.stats = OutboxStats(
            pending=stats.pending,
            parked=stats.parked,
            failing=stats.failing,
            oldest_pending_at=stats.oldest_pending_at,
            last_error=self.last_error or stats.last_error,
            at=stats.at,
        )
        return self.stats

    def pending_count(self) -> int:
        return self.refresh_stats().pending

    def _apply_pending(self, result: _PassResult, deadline: float, ignore_backoff: bool = False) -> None:
        assert self.mirror is not None
        now = datetime.max if ignore_backoff else utcnow()
        # model -> the lowest version whose create_version is still pending: rows naming it (or a later version)
        # wait, MLflow has no such version yet (and numbers versions in order).
        waiting_version: dict[str, int] = {}
        after_id = 0
        while True:
            with self.db.read() as s:
                rows = s.scalars(
                    _pending(select(OutboxItem))
                    .where(OutboxItem.id > after_id)
                    .order_by(OutboxItem.id)
                    .limit(_BATCH)
                ).all()
            if not rows:
                return
            after_id = rows[-1].id
            latest = {_supersede_key(r): r.id for r in rows if _supersede_key(r) is not None}
            done: list[OutboxItem] = []
            try:
                for row in rows:
                    key = _supersede_key(row)
                    if key is not None and latest[key] != row.id:
                        done.append(row)  # a later write of the same alias/tag follows: only it matters
                        continue
                    version = int(row.payload.get("version") or 0)
                    if row.model_name in waiting_version and version >= waiting_version[row.model_name]:
                        result.waiting += 1
                        continue
                    if row.next_attempt_at is not None and row.next_attempt_at > now:
                        result.waiting += 1
                        result.outage = True  # backing off: calling run_once again now changes nothing
                        self._hold(waiting_version, row)
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        result.deadline_hit = True
                        result.errors.append(f"pass deadline ({self.retry.pass_deadline_s:g} s) reached")
                        return
                    try:
                        self.mirror.apply(
                            row.kind,
                            row.model_name,
                            row.payload,
                            timeout_s=min(self.retry.call_timeout_s, left),
                        )
                    except Exception as exc:
                        cls = classify(exc)
                        parked = self._failed(row, exc, cls, result)
                        if not parked:
                            self._hold(waiting_version, row)
                        if cls == UNREACHABLE:
                            result.unreachable = True  # no answer: the next row would only wait again
                            return
                        continue
                    done.append(row)
            finally:
                self._mark_applied(done)
                result.applied += len(done)
            if len(rows) < _BATCH:
                return

    @staticmethod
    def _hold(waiting_version: dict[str, int], row: OutboxItem) -> None:
        if row.kind == "create_version":
            v = int(row.payload["version"])
            waiting_version[row.model_name] = min(v, waiting_version.get(row.model_name, v))

    def _failed(self, row: OutboxItem, exc: BaseException, cls: str, result: _PassResult) -> bool:
        """Record a failed attempt: park the row or schedule its next attempt. Returns True when parked."""
        msg = f"outbox {row.id} ({row.kind} {row.model_name}): {cls}: {type(exc).__name__}: {exc}"[:2000]
        now = utcnow()
        attempts = row.attempts + 1
        since = row.failing_since or now
        budget = timedelta(seconds=self.retry.retry_budget_s)
        park = (
            cls == REFUSED
            or (cls == INTERNAL and attempts >= self.retry.internal_error_attempts)
            or now - since >= budget
        )
        if park:
            self._park(row, msg)
            result.errors.append(f"parked {msg}")
            log.error("MLflow write parked: %s", msg)
            return True
        next_at = now + self.retry.backoff(attempts)

        def tx(s: Session) -> None:
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id == row.id)
                .values(attempts=attempts, last_error=msg, next_attempt_at=next_at, failing_since=since)
            )

        self.db.transact(tx)
        self.last_error = msg
        result.failed += 1
        result.outage = True
        result.errors.append(msg)
        log.warning("MLflow write failed (attempt %d, next in %s): %s", attempts, next_at - now, msg)
        return False

    def _park(self, row: OutboxItem, msg: str) -> None:
        def tx(s: Session) -> None:
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id == row.id)
                .values(
                    parked_at=utcnow(), attempts=OutboxItem.attempts + 1, last_error=msg, next_attempt_at=None
                )
            )
            _audit(s, row, "mlflow_parked", SYSTEM_ACTOR, "admin", msg)

        self.db.transact(tx)
        self._notify([(row.id, "parked")])

    def _mark_applied(self, done: list[OutboxItem]) -> None:
        """Mark ``done`` applied, and every earlier unapplied row (pending or parked) of the same alias/tag as
        superseded (applied): MLflow now holds the newer value."""
        if not done:
            return
        superseded: list[int] = []

        def tx(s: Session) -> None:
            ids = [r.id for r in done]
            s.execute(
                update(OutboxItem)
                .where(OutboxItem.id.in_(ids))
                .values(applied_at=utcnow(), next_attempt_at=None, failing_since=None)
            )
            newest = {}
            for r in done:
                if (key := _supersede_key(r)) is not None:
                    newest[key] = max(newest.get(key, 0), r.id)
            if not newest:
                return
            models = {k[0] for k in newest}
            older = s.scalars(
                select(OutboxItem).where(
                    OutboxItem.applied_at.is_(None),
                    OutboxItem.model_name.in_(models),
                    OutboxItem.kind.in_(("set_alias", "set_version_tag")),
                )
            ).all()
            for o in older:
                if o.id < newest.get(_supersede_key(o), 0):  # type: ignore[arg-type]
                    superseded.append(o.id)
            if superseded:
                s.execute(
                    update(OutboxItem)
                    .where(OutboxItem.id.in_(superseded))
                    .values(applied_at=utcnow(), next_attempt_at=None)
                )

        self.db.transact(tx)
        self._notify([(r.id, "applied") for r in done] + [(i, "applied") for i in superseded])

    def _notify(self, states: list[tuple[int, str]]) -> None:
        with self._applied:
            self._settled.update(states)
            while len(self._settled) > _SETTLED_KEEP:
                self._settled.popitem(last=False)
            self._applied.notify_all()

    def _repair_drift(
        self, result: ReconcileResult, models: Collection[str] | None = None, deadline: float | None = None
    ) -> None:
        """Make MLflow's aliases equal the database's. Skips models with writes still pending (MLflow is behind
        by design there, not drifted; the applier lock is held, so nothing is applied while this runs) and, of a
        model with parked writes, only the aliases those concern (a parked ``set_alias``, or an alias on a
        version whose ``create_version`` is parked): the rest of that model is still repaired."""
        assert self.mirror is not None
        deadline = deadline if deadline is not None else time.monotonic() + self.retry.pass_deadline_s
        with self.db.read() as s:
            rows = s.execute(select(RegisteredModel.name, Alias.alias, Alias.version).join(Alias)).all()
            unsettled = set(s.scalars(_pending(select(OutboxItem.model_name)).distinct()))
            parked_rows = s.execute(
                _parked(select(OutboxItem.model_name, OutboxItem.kind, OutboxItem.payload))
            ).all()
        skip_alias = {(m, p.get("alias")) for m, k, p in parked_rows if k == "set_alias"}
        skip_version = {(m, int(p["version"])) for m, k, p in parked_rows if k == "create_version"}
        by_model: dict[str, dict[str, int]] = {}
        for name, alias, version in rows:
            if name in unsettled or (models is not None and name not in models):
                continue
            if (name, alias) in skip_alias or (name, version) in skip_version:
                continue
            by_model.setdefault(name, {})[alias] = version
        for name, want in by_model.items():
            left = deadline - time.monotonic()
            if left <= 0:
                result.errors.append("drift check: pass deadline reached")
                return
            try:
                have = self.mirror.aliases_bounded(name, min(self.retry.call_timeout_s, left))
                for alias, version in want.items():
                    if have.get(alias) != version:
                        # Someone moved the alias in MLflow directly (or a write was lost): the DB wins.
                        self.mirror.apply(
                            "set_alias",
                            name,
                            {"alias": alias, "version": version},
                            timeout_s=self.retry.call_timeout_s,
                        )
                        result.drift_fixed.append(f"{name}@{alias}: MLflow {have.get(alias)} -> {version}")
                        log.warning("alias drift repaired: %s", result.drift_fixed[-1])
            except Exception as exc:  # one model's failure must not stop the check of the others
                result.errors.append(f"drift check of {name}: {type(exc).__name__}: {exc}"[:500])
                if classify(exc) == UNREACHABLE:
                    return

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
    """Another applier held the lock (another process, or ``busy``); nothing was applied by this call."""
    busy: bool = False
    """``run_once(wait=False)`` found a pass of this process running."""
    outage: bool = False
    """A write failed or is backing off (it is retried later): running another pass right away will not help."""
    unreachable: bool = False
    """A call got no answer (connection refused, timeout): the pass stopped there and skipped the drift check."""
    failed: int = 0
    """Rows that failed in this pass and wait for their next attempt."""
    waiting: int = 0
    """Rows not tried in this pass: backing off, or waiting for their version's ``create_version``."""
    deadline_hit: bool = False
    """The pass stopped at its deadline; the rest waits for the next pass."""


def _supersede_key(row: OutboxItem) -> tuple[Any, ...] | None:
    """Rows with one key overwrite each other in MLflow (upserts): only the newest matters."""
    if row.kind == "set_alias":
        return (row.model_name, "alias", row.payload.get("alias"))
    if row.kind == "set_version_tag":
        return (row.model_name, "tag", int(row.payload["version"]), row.payload.get("key"))
    return None


def _audit(s: Session, row: OutboxItem, action: str, actor: str, role: str, reason: str) -> None:
    """One audit event on the row's model (the model row is locked for the gapless sequence)."""
    model = s.scalar(select(RegisteredModel).where(RegisteredModel.name == row.model_name).with_for_update())
    if model is None:
        return
    s.add(
        AuditEvent(
            model_id=model.id,
            seq=next_audit_seq(model),
            action=action,
            alias=row.payload.get("alias"),
            to_version=row.payload.get("version"),
            actor=actor,
            role=role,
            reason=reason[:2000],
        )
    )


# ----------------------------------------------------------------------------------- admin: parked rows
def list_outbox(db: Database, *, include_pending: bool = True, limit: int = 1000) -> list[OutboxItem]:
    """Unapplied rows, parked first then pending, oldest first within each."""
    with db.read() as s:
        q = select(OutboxItem).where(OutboxItem.applied_at.is_(None))
        if not include_pending:
            q = q.where(OutboxItem.parked_at.is_not(None))
        rows = s.scalars(q.order_by(OutboxItem.parked_at.is_(None), OutboxItem.id).limit(limit)).all()
        s.expunge_all()
        return list(rows)


def _unapplied_row(s: Session, row_id: int) -> OutboxItem:
    row = s.scalar(select(OutboxItem).where(OutboxItem.id == row_id).with_for_update())
    if row is None:
        raise NotFound(f"outbox: no row {row_id}")
    if row.applied_at is not None:
        raise Conflict(f"outbox: row {row_id} is already applied (or superseded)")
    return row


def retry_parked(db: Database, row_id: int, actor: str, role: str, reason: str) -> OutboxItem:
    """Make row ``row_id`` (parked, or pending and backing off) due now with a fresh budget; audited as
    ``mlflow_retry``. Raises ``NotFound`` / ``Conflict`` (already applied)."""

    def tx(s: Session) -> OutboxItem:
        row = _unapplied_row(s, row_id)
        row.parked_at, row.next_attempt_at, row.failing_since, row.attempts = None, None, None, 0
        _audit(s, row, "mlflow_retry", actor, role, f"outbox {row.id} ({row.kind}): {reason}")
        s.flush()
        s.expunge(row)
        return row

    return db.transact(tx)


def drop_parked(db: Database, row_id: int, actor: str, role: str, reason: str) -> OutboxItem:
    """Give up on row ``row_id`` for good (it is settled as applied without reaching MLflow; ``last_error`` and
    the ``mlflow_dropped`` audit event say so). Raises ``NotFound`` / ``Conflict``."""

    def tx(s: Session) -> OutboxItem:
        row = _unapplied_row(s, row_id)
        row.applied_at, row.next_attempt_at = utcnow(), None
        row.last_error = f"dropped by {actor}: {reason} (was: {row.last_error})"[:2000]
        _audit(s, row, "mlflow_dropped", actor, role, f"outbox {row.id} ({row.kind}): {reason}")
        s.flush()
        s.expunge(row)
        return row

    return db.transact(tx)


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
