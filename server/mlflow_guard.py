"""Bounded MLflow reads inside requests and CLI commands: a per-read timeout, ONE total budget per request
(:class:`Deadline`), a cap on reads in flight, and a circuit breaker.

The MLflow client retries a failed HTTP call with backoff for minutes, and a server that accepts connections but
never answers holds a call for as long as the client's own timeout (120 s by default). Called from a request thread,
that let 45 concurrent ``status`` calls with MLflow down hold every worker thread (and ``/health`` with them), and a
``lineage`` of a version with a few dozen linked runs took 0.5 s per run in sequence behind a slow MLflow. Here:

* every read runs on its own **daemon** thread: the caller waits at most ``timeout_s`` for it and at most what is
  left of the request's :class:`Deadline`; an abandoned read keeps its thread until MLflow's client gives up, and
  because the thread is a daemon, it never holds up the exit of a CLI process (``concurrent.futures`` pools are
  joined at interpreter exit, which made an in-process ``oprd-ci status`` wait ~10 s more on a dead MLflow);
* at most ``max_in_flight`` reads of this process are in flight at once; a read waits for a slot only as long as
  its deadline allows, then it is skipped;
* after ``failures`` consecutive reads without an answer the breaker opens for ``open_s``: reads fail at once with
  :class:`MlflowUnavailable` naming the last error;
* :meth:`MlflowGuard.call_all` runs a batch of reads concurrently within one deadline (``lineage``): the answers
  that came in time, and the error or "skipped" for the others.

The reconciler (a background thread, the only MLflow writer) does not go through here: it may take its time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

from server.mlflow_mirror import mlflow_error_code

if TYPE_CHECKING:
    from server.settings import ServerSettings

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
# Error codes that are MLflow's answer (the server is up): they do not count against the breaker.
_ANSWERS = {
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_PARAMETER_VALUE",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}
ReadState = Literal["ok", "partial", "unavailable", "off"]


class MlflowUnavailable(RuntimeError):
    """MLflow did not answer in time, too many reads are stuck on it, or the breaker is open."""


class MlflowSkipped(MlflowUnavailable):
    """The read was not made, or its answer not awaited, because the request's MLflow budget was spent."""


@dataclass
class Deadline:
    """One total budget (seconds, monotonic clock) for every MLflow read of one request or CLI command.

    Reads record here whether MLflow answered (``answered``) or not (``missing``: timed out, failed, skipped), so
    the response can say how complete its MLflow part is (:attr:`state`)."""

    budget_s: float
    at: float = field(default=0.0)
    answered: int = 0
    missing: int = 0
    _mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.at:
            self.at = time.monotonic() + self.budget_s

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - time.monotonic())

    def note(self, answered: bool) -> None:
        with self._mutex:
            if answered:
                self.answered += 1
            else:
                self.missing += 1

    @property
    def state(self) -> ReadState:
        """``ok`` every read answered (an MLflow error such as "does not exist" is an answer), ``unavailable`` none
        did, ``partial`` some did; ``off`` no read was attempted."""
        if not self.missing:
            return "ok" if self.answered else "off"
        return "partial" if self.answered else "unavailable"


class MlflowGuard:
    def __init__(
        self, timeout_s: float, failures: int, open_s: float, max_in_flight: int = 8, budget_s: float = 5.0
    ) -> None:
        self.timeout_s, self.failures, self.open_s, self.max_in_flight, self.budget_s = (
            timeout_s,
            failures,
            open_s,
            max_in_flight,
            budget_s,
        )
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._mutex = threading.Lock()
        self._in_flight = 0
        self._consecutive = 0
        self._open_until = 0.0
        self._closed = False
        self.last_error: str | None = None
        """The newest request-path failure while MLflow is failing; None once a read succeeds again."""

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> MlflowGuard:
        """The guard the service's settings describe (``mlflow_request_timeout_s``, ``mlflow_request_budget_s``,
        ``mlflow_read_concurrency``, ``mlflow_breaker_*``)."""
        return cls(
            settings.mlflow_request_timeout_s,
            settings.mlflow_breaker_failures,
            settings.mlflow_breaker_open_s,
            settings.mlflow_read_concurrency,
            settings.mlflow_request_budget_s,
        )

    def deadline(self, budget_s: float | None = None) -> Deadline:
        """A fresh budget for one request (``budget_s`` default: ``mlflow_request_budget_s``)."""
        return Deadline(self.budget_s if budget_s is None else budget_s)

    # ------------------------------------------------------------------------------------------ reads
    def call(self, fn: Callable[..., T], *args: object, deadline: Deadline | None = None) -> T:
        """``fn(*args)`` bounded by ``timeout_s`` and by ``deadline`` (default: a fresh one of ``budget_s``).
        Raises :class:`MlflowSkipped` when the budget is spent, :class:`MlflowUnavailable` when MLflow did not
        answer (or the breaker is open); MLflow's own answers (``RESOURCE_DOES_NOT_EXIST``...) are re-raised."""
        deadline = deadline or self.deadline()
        future, started = self._submit(fn, args, deadline)
        return self._result(future, started, deadline)

    def call_all(
        self, calls: dict[K, tuple[Callable[..., object], tuple[object, ...]]], deadline: Deadline
    ) -> dict[K, object | BaseException]:
        """Run every ``key: (fn, args)`` concurrently (at most ``max_in_flight`` of this process at once), all within
        ``deadline``. Returns ``key: answer`` or ``key: exception`` (:class:`MlflowSkipped` for reads the budget
        did not reach or whose answer came too late). Never waits past the deadline."""
        out: dict[K, object | BaseException] = {}
        started: dict[K, tuple[Future, float]] = {}
        for key, (fn, args) in calls.items():
            try:
                started[key] = self._submit(fn, args, deadline)
            except MlflowUnavailable as exc:
                out[key] = exc
            self._reap(started, out, deadline, block=False)
        self._reap(started, out, deadline, block=True)
        return {key: out[key] for key in calls}

    def _reap(
        self,
        started: dict[K, tuple[Future, float]],
        out: dict[K, object | BaseException],
        deadline: Deadline,
        *,
        block: bool,
    ) -> None:
        """Collect finished reads into ``out``; with ``block``, wait for the rest until each one's own timeout or
        the deadline, whichever is first."""
        while started:
            if block:
                soonest = min(t for _, t in started.values()) + self.timeout_s
                limit = min(soonest - time.monotonic(), deadline.left())
                wait_futures(
                    [f for f, _ in started.values()], timeout=max(0.0, limit), return_when="FIRST_COMPLETED"
                )
            for key, (future, t0) in list(started.items()):
                if future.done() or time.monotonic() >= t0 + self.timeout_s or not deadline.left():
                    del started[key]
                    try:
                        out[key] = self._result(future, t0, deadline)
                    except Exception as exc:  # handed to the caller, per key
                        out[key] = exc
            if not block:
                return

    def _submit(
        self, fn: Callable[..., T], args: tuple[object, ...], deadline: Deadline
    ) -> tuple[Future, float]:
        """Start ``fn(*args)`` on a daemon thread once a slot is free (waiting for one at most until the deadline)."""
        with self._mutex:
            now = time.monotonic()
            if self._closed:
                raise MlflowSkipped("MLflow read skipped: the service is shutting down")
            if now < self._open_until:
                deadline.note(False)
                raise MlflowUnavailable(
                    f"MLflow unavailable (circuit open {self._open_until - now:.0f} s more after "
                    f"{self._consecutive} failures): {self.last_error}"
                )
        if not deadline.left() or not self._slots.acquire(timeout=deadline.left()):
            deadline.note(False)
            with self._mutex:
                busy = self._in_flight
            raise MlflowSkipped(
                f"MLflow read skipped: the budget of {deadline.budget_s:g} s was spent"
                + (f" ({busy} reads were in flight)" if busy else "")
            )
        with self._mutex:
            self._in_flight += 1
        future: Future = Future()

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # delivered to the waiting request
                        future.set_exception(exc)
            finally:
                with self._mutex:
                    self._in_flight -= 1
                self._slots.release()

        # A daemon: a read MLflow never answers must not keep a CLI process alive at exit.
        threading.Thread(target=run, name="oprd-mlflow-read", daemon=True).start()
        return future, time.monotonic()

    def _result(self, future: Future, started: float, deadline: Deadline) -> T:
        own = started + self.timeout_s - time.monotonic()
        budget = deadline.left()
        try:
            result = future.result(timeout=max(0.0, min(own, budget)))
        except FutureTimeout:
            deadline.note(False)
            if (
                budget < own
            ):  # cut short by the request's budget: no evidence against MLflow, no breaker count
                raise MlflowSkipped(
                    f"MLflow did not answer within the request's budget of {deadline.budget_s:g} s"
                ) from None
            raise self._failed(f"no answer within {self.timeout_s:g} s") from None
        except Exception as exc:
            if mlflow_error_code(exc) in _ANSWERS:
                deadline.note(True)
                self._succeeded()
                raise
            deadline.note(False)
            raise self._failed(f"{type(exc).__name__}: {exc}") from exc
        deadline.note(True)
        self._succeeded()
        return result

    def _succeeded(self) -> None:
        with self._mutex:
            self._consecutive, self._open_until, self.last_error = 0, 0.0, None

    def _failed(self, why: str) -> MlflowUnavailable:
        with self._mutex:
            self._consecutive += 1
            self.last_error = f"MLflow unavailable: {why}"[:500]
            if self._consecutive >= self.failures:
                self._open_until = time.monotonic() + self.open_s
            return MlflowUnavailable(self.last_error)

    def shutdown(self) -> None:
        """Refuse new reads. Reads in flight are abandoned, not awaited (their threads are daemons)."""
        with self._mutex:
            self._closed = True
