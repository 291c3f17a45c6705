"""Per-step metrics to MLflow that survive a tracking outage and never vanish silently.

:class:`MlflowMetricLogger` implements ``trainer.metrics.MetricLogger``. It buffers metrics and sends them with
``MlflowClient.log_batch``. When a send fails (server down, network blip) training goes on: the metrics stay
in the buffer and the next send is attempted after an exponential backoff (``backoff_s * 2**n``), without
blocking the training step in between. ``close()`` makes up to ``retries + 1`` final attempts with the same
backoff; if the buffer still cannot be sent it writes the unsent metrics to ``spill_path`` (when given) and
raises :class:`MetricsNotLogged`, so the stage fails loudly instead of finishing with holes in its curves.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

__all__ = ["MetricsNotLogged", "MlflowMetricLogger"]

log = logging.getLogger(__name__)

_MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit


class MetricsNotLogged(RuntimeError):
    """Buffered metrics could not be sent to MLflow after every retry; names the URI, count and spill file."""


class MlflowMetricLogger:
    """``trainer.metrics.MetricLogger`` backed by an MLflow run.

    Args:
        run_id: the run the metrics belong to (``StageRun.run_id``).
        tracking_uri: the store (``StageRun.tracking_uri``); ``client`` may be given instead.
        retries: extra attempts at ``close()`` (``tracking.retries``).
        backoff_s: first wait between attempts (``tracking.backoff_s``); doubles per consecutive failure.
        flush_every: send after this many ``log_metrics`` calls (1 = every step). Buffering more steps per
            request saves round trips when steps are fast.
        spill_path: where unsent metrics go as JSON lines (``{"key", "value", "timestamp", "step"}``) when
            ``close()`` gives up, so they can be replayed with :meth:`replay_spill`.

    Non-finite values are logged as MLflow stores them (NaN/inf are allowed); a NaN loss is information.
    """

    def __init__(
        self,
        run_id: str,
        *,
        tracking_uri: str | None = None,
        client: MlflowClient | None = None,
        retries: int = 3,
        backoff_s: float = 1.0,
        flush_every: int = 1,
        spill_path: str | Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.run_id = run_id
        self.client = client or MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = self.client.tracking_uri
        self.retries = retries
        self.backoff_s = backoff_s
        self.flush_every = max(1, flush_every)
        self.spill_path = Path(spill_path) if spill_path is not None else None
        self._sleep = sleep
        self._buffer: list[Metric] = []
        self._calls = 0
        self._failures = 0  # consecutive failed sends
        self._next_attempt = 0.0  # monotonic time before which no send is tried (backoff during an outage)
        self._closed = False
        self.last_error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Metrics buffered and not yet acknowledged by MLflow."""
        return len(self._buffer)

    @property
    def in_outage(self) -> bool:
        """True while the last send failed."""
        return self._failures > 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step`` and send the buffer when due; never raises on a tracking outage."""
        if self._closed:
            raise RuntimeError("MlflowMetricLogger.log_metrics after close()")
        now_ms = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items())
        self._calls += 1
        if self._calls % self.flush_every == 0 and time.monotonic() >= self._next_attempt:
            self._try_flush()

    def flush(self) -> bool:
        """Try to send the whole buffer once now; True when it is empty afterwards."""
        return self._try_flush()

    def close(self) -> None:
        """Send everything that is buffered, retrying ``retries`` times with backoff.

        Raises:
            MetricsNotLogged: MLflow still refused after the last attempt (metrics spilled if configured).
        """
        if self._closed:
            return
        for attempt in range(self.retries + 1):
            if self._try_flush():
                self._closed = True
                return
            if attempt < self.retries:
                self._sleep(self.backoff_s * 2**attempt)
        self._closed = True
        spilled = self._spill()
        steps = sorted({m.step for m in self._buffer})
        where = f"; written to {spilled} (replay with MlflowMetricLogger.replay_spill)" if spilled else ""
        raise MetricsNotLogged(
            f"{len(self._buffer)} metrics of run {self.run_id} (steps {steps[0]}..{steps[-1]}) could not be "
            f"logged to MLflow at {self.tracking_uri} after {self.retries + 1} attempts "
            f"({type(self.last_error).__name__}: {self.last_error}){where}; bring the tracking server back "
            "and rerun the stage"
        )

    def _try_flush(self) -> bool:
        while self._buffer:
            chunk = self._buffer[:_MAX_METRICS_PER_REQUEST]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as exc:  # MlflowException, requests/OS errors: all mean "not stored (yet)"
                self._failures += 1
                self.last_error = exc
                delay = self.backoff_s * 2 ** min(self._failures - 1, 6)
                self._next_attempt = time.monotonic() + delay
                log.warning(
                    "MLflow unreachable at %s (%s); %d metrics buffered, next try in %.1fs",
                    self.tracking_uri,
                    type(exc).__name__,
                    len(self._buffer),
                    delay,
                )
                return False
            # Drop only what MLflow acknowledged; a retry of an unacknowledged chunk is harmless because
            # MLflow ignores an exact duplicate (same key, step, timestamp, value).
            del self._buffer[: len(chunk)]
        if self._failures:
            log.warning("MLflow at %s is back; buffered metrics sent", self.tracking_uri)
        self._failures = 0
        self._next_attempt = 0.0
        return True

    def _spill(self) -> Path | None:
        if self.spill_path is None or not self._buffer:
            return None
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a") as fh:
            for m in self._buffer:
                value = m.value if math.isfinite(m.value) else str(m.value)
                fh.write(
                    json.dumps({"key": m.key, "value": value, "timestamp": m.timestamp, "step": m.step})
                    + "\n"
                )
        return self.spill_path

    @staticmethod
    def replay_spill(run_id: str, spill_path: str | Path, *, client: MlflowClient) -> int:
        """Log the metrics of a spill file to ``run_id``; returns how many were sent."""
        metrics = []
        for line in Path(spill_path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                metrics.append(
                    Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"]))
                )
        for i in range(0, len(metrics), _MAX_METRICS_PER_REQUEST):
            client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS_PER_REQUEST], synchronous=True)
        return len(metrics)
