"""Readable stage logs: third-party noise off, our progress bars and messages kept.

:func:`quiet_third_party` is called first thing by every DVC stage entry point (``stage_io.stage_cli``):

* environment for libraries imported later (and for torchrun workers, which inherit it): transformers at
  ``error`` verbosity without advisory warnings, no Hugging Face Hub / weight-loading progress bars, no tokenizers
  fork warning;
* Python warnings: each distinct warning once per process (``"once"``) instead of once per call site and step;
  the library warnings of :data:`LIBRARY_WARNINGS` (SQLAlchemy deprecations inside MLflow's store, DCP's
  single-process notice) not at all, here and in child processes (``PYTHONWARNINGS``); the MLflow / alembic /
  httpx loggers at WARNING;
* an fd-level stderr filter (:class:`StderrFilter`): the PyTorch profiler (kineto) prints ``USDT: ...`` /
  ``STAGE: ...`` lines from C++ each time the actor-update memory is measured, which no Python setting reaches.
  Lines matching :data:`NOISE` are dropped; everything else (tracebacks, our ``error:`` lines, tqdm redraws) is
  passed through unchanged and immediately.

Set ``OPRD_VERBOSE_LOGS=1`` to keep everything.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import os
import re
import sys
import threading
import warnings

__all__ = ["LIBRARY_WARNINGS", "NOISE", "StderrFilter", "quiet_third_party"]

NOISE = re.compile(
    rb"(?:USDT:|STAGE:\d|\[W\d+ [^\n]*(?:Profiler|kineto|CUPTI)|[^\r\n]*ActivityProfilerController|"
    rb"Loading weights:|Loading checkpoint shards:)"
)
"""Start of noise: kineto's start/stop chatter and weight-loading progress bars. A line is cut from the match
to its end (kineto writes right after a progress-bar frame, without a newline; the frame is kept)."""

LIBRARY_WARNINGS: tuple[tuple[str, str, str], ...] = (
    # MLflow's SQL store on SQLAlchemy 2: "The ``noload`` loader strategy is deprecated" and its kin, per process
    ("", "DeprecationWarning", "mlflow.store.tracking.sqlalchemy_store"),
    ("", "DeprecationWarning", "mlflow.store.model_registry.sqlalchemy_store"),
    # DCP on one process (the default distill stage): "... assuming the intent is to save/load in a single process"
    ("torch.distributed is disabled", "UserWarning", ""),
)
"""``(message prefix, category, module)`` of warnings that say nothing about this run; ignored unless verbose.
The ``-W`` / ``PYTHONWARNINGS`` syntax: the message matches at the start (no commas: they separate entries), the
module exactly, ``""`` = any."""

_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "KINETO_LOG_LEVEL": "5",
}
_installed: StderrFilter | None = None


class StderrFilter:
    """Route file descriptor 2 through a pipe and drop lines matching ``pattern``.

    Complete lines are filtered (cut where :data:`NOISE` starts); a progress-bar frame ending in ``\\r`` is
    forwarded at once.
    :meth:`close` (registered with ``atexit``) restores fd 2 and drains the pipe.
    """

    def __init__(self, pattern: re.Pattern[bytes] = NOISE) -> None:
        self.pattern = pattern
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()

    def _emit(self, data: bytes) -> None:
        if data:
            os.write(self._saved, data)

    def _pump(self) -> None:
        buf = b""
        while chunk := os.read(self._r, 65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            self._emit(b"".join(self._clean(line, b"\n") for line in lines))
            if b"\r" in buf:  # progress-bar redraws: forward each finished frame now, unless it is noise
                *frames, buf = buf.split(b"\r")
                self._emit(b"".join(self._clean(f, b"\r") for f in frames))
        self._emit(self._clean(buf, b""))

    def _clean(self, line: bytes, end: bytes) -> bytes:
        m = self.pattern.search(line)
        if m is None:
            return line + end
        return line[: m.start()]  # the noise and its line end go; a bar frame before it stays

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end in this process: the pump sees EOF
        self._thread.join(timeout=5)
        os.close(self._r)


def quiet_third_party(*, fd_filter: bool = True) -> None:
    """Silence third-party noise in this process and its children (idempotent; see the module docstring).
    ``fd_filter=False`` leaves file descriptor 2 alone (in-process callers such as tests that capture it)."""
    global _installed
    if os.environ.get("OPRD_VERBOSE_LOGS") == "1":
        return
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    warnings.simplefilter("once")
    for message, category, module in LIBRARY_WARNINGS:  # after "once": these filters are matched first
        warnings.filterwarnings(
            "ignore",
            message=re.escape(message),
            category=getattr(builtins, category),
            module=re.escape(module) + r"\Z" if module else "",
        )
    inherited = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    ours = [f"ignore:{m}:{c}:{mod}" for m, c, mod in LIBRARY_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join([*inherited, *(w for w in ours if w not in inherited)])
    for name in ("mlflow", "alembic", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if _installed is None and fd_filter:
        try:
            _installed = StderrFilter()
        except OSError:  # no usable fd 2 (a closed stderr): leave the stream alone
            return
        atexit.register(_installed.close)
