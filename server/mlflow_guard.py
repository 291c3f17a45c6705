"""Bounded MLflow reads inside requests: a timeout, a cap on reads in flight, and a circuit breaker.

The MLflow client retries a failed HTTP call with backoff for minutes. Called from a request thread, that
let 45 concurrent ``status`` calls with MLflow down hold every worker thread (and ``/health`` with them).
Here a read runs on a small private pool: the request waits at most ``timeout_s``; when ``max_in_flight``
reads are already stuck, or the breaker is open after ``failures`` consecutive failures, the read fails at
once with ``MlflowUnavailable`` naming the last error. Only the pool's few threads can be stuck in MLflow's
retries. The reconciler (a background thread) does not go through here: it may take its time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, TypeVar

from server.mlflow_mirror import mlflow_error_code

if TYPE_CHECKING:
    from server.settings import ServerSettings

T = TypeVar("T")
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


class MlflowUnavailable(RuntimeError):
    """MLflow did not answer in time, too many reads are stuck on it, or the breaker is open."""


class MlflowGuard:
    def __init__(self, timeout_s: float, failures: int, open_s: float, max_in_flight: int = 4) -> None:
        self.timeout_s, self.failures, self.open_s, self.max_in_flight = (
            timeout_s,
            failures,
            open_s,
            max_in_flight,
        )
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="oprd-mlflow-read")
        self._mutex = threading.Lock()
        self._in_flight = 0
        self._consecutive = 0
        self._open_until = 0.0
        self.last_error: str | None = None
        """The newest request-path failure while MLflow is failing; None once a read succeeds again."""

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> MlflowGuard:
        """The guard the service's settings describe (``mlflow_request_timeout_s``, ``mlflow_breaker_*``)."""
        return cls(
            settings.mlflow_request_timeout_s,
            settings.mlflow_breaker_failures,
            settings.mlflow_breaker_open_s,
        )

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the guard's pool, bounded as described in the module docstring."""
        with self._mutex:
            now = time.monotonic()
            if now < self._open_until:
                raise MlflowUnavailable(
                    f"MLflow unavailable (circuit open {self._open_until - now:.0f} s more after "
                    f"{self._consecutive} failures): {self.last_error}"
                )
            if self._in_flight >= self.max_in_flight:
                raise MlflowUnavailable(
                    f"MLflow unavailable: {self._in_flight} reads already waiting on it ({self.last_error})"
                )
            self._in_flight += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._release)
        try:
            result = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise self._failed(f"no answer within {self.timeout_s:g} s") from None
        except Exception as exc:
            if mlflow_error_code(exc) in _ANSWERS:
                self._succeeded()
                raise
            raise self._failed(f"{type(exc).__name__}: {exc}") from exc
        self._succeeded()
        return result

    def _release(self, _future: object) -> None:
        with self._mutex:
            self._in_flight -= 1

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
        self._pool.shutdown(wait=False, cancel_futures=True)
