"""Metric logging behind a small protocol, so the trainer knows nothing about MLflow.

``MetricLogger`` is what the trainer calls; :class:`JsonlLogger` and :class:`ConsoleLogger` ship here, the
MLflow logger lives in ``pipelines`` and is injected. :class:`LoggerGroup` fans out to several. Only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable

__all__ = ["ConsoleLogger", "JsonlLogger", "LoggerGroup", "MetricLogger", "NullLogger", "StepFloor"]


@runtime_checkable
class MetricLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (non-zero ranks, tests)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per step: ``{"step": s, "<name>": value, ...}``. The file is rewritten per process; a
    resumed trainer re-emits its restored steps first, so each step appears exactly once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        row = {
            "step": step,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        }
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class ConsoleLogger:
    """A compact line every ``every`` steps with the keys that matter most."""

    KEYS = ("loss/total", "rep/cosine/mean", "response/length_mean", "perf/step_seconds", "val/accuracy")

    def __init__(self, every: int = 10, stream: TextIO = sys.stderr):
        self.every = every
        self.stream = stream

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step % self.every and "val/accuracy" not in metrics:
            return
        parts = [f"{k.split('/')[-1]}={metrics[k]:.4g}" for k in self.KEYS if k in metrics]
        print(f"step {step}: " + " ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class LoggerGroup:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = list(loggers)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_metrics(metrics, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class StepFloor:
    """Forwards only steps after ``floor`` to ``inner``: a sink that outlives a restarted process (the MLflow run of
    a Ray job whose worker group was restarted) already holds steps ``1..floor``, and a resumed trainer re-emits its
    restored steps, so each step still reaches it exactly once."""

    def __init__(self, inner: MetricLogger, floor: int):
        self.inner = inner
        self.floor = floor

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if step > self.floor:
            self.inner.log_metrics(metrics, step)

    def close(self) -> None:
        self.inner.close()
