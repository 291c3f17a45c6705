"""Transient peak memory of a code region (the actor update), with oprd-method.md §8 semantics.

``with PeakMemory("auto") as pm: <update>`` then ``pm.peak_bytes`` is the *transient* peak: the highest memory in
use during the region minus what was in use when it started (the paper's "∆peak"), in **bytes**. Divide by
``1024**3`` for the paper's "GB" (which are GiB).

Methods (``method=``):

``cuda``
    §8 protocol: ``synchronize; reset_peak_memory_stats; before = memory_allocated`` on entry,
    ``synchronize; peak = max_memory_allocated - before`` on exit. Also fills ``peak_reserved_bytes``
    (``max_memory_reserved``, absolute, as the reference logs it) and ``peak_allocated_bytes`` (absolute).
    Cheap: safe every step.
``profiler``
    CPU, allocator-exact and deterministic (stack-notes §3, perf-notes): runs the region under
    ``torch.profiler.profile(activities=[CPU], profile_memory=True)``, replays the ``[memory]`` events (``+nbytes``
    per allocation, ``-nbytes`` per free) in ``start_ns`` order and takes the max of the running sum (floored at 0).
    Counts tensor bytes only (what a caching allocator on a GPU would have to find room for). Tensors freed inside
    the region that were allocated before it count negatively, exactly as with the CUDA ``- before`` baseline.
    Costs roughly a second of profiler set-up plus per-op recording: use it every N steps, not every step.
    Uses ``prof.profiler.kineto_results.events()``, a semi-private path (the public ``key_averages()`` has no peak).
``rss``
    Whole-process cross-check (Linux): writes ``"5"`` to ``/proc/self/clear_refs`` (resets ``VmHWM`` to the current
    RSS), reads ``VmRSS`` on entry and ``VmHWM - VmRSS_before`` on exit; page-granular, includes non-tensor memory
    (oneDNN scratch, Python objects). **Only meaningful with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``
    in the environment at process start**: otherwise glibc reuses already-resident freed pages and the delta comes
    out far too small or even negative. Per process: under torchrun each rank measures itself. Almost free.
``auto``
    ``cuda`` when ``device`` is a CUDA device (default: the current one when CUDA is available), else ``profiler``.

When ``torch.distributed`` is initialized and ``all_reduce=True``, each scalar is ``all_reduce(MAX)``-ed separately
(so the maxima may come from different ranks, as in the reference). That is a collective: every rank must exit the
region.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Literal

import torch

__all__ = ["MALLOC_ENV", "MemoryMethod", "PeakMemory", "replay_peak", "rss_method_reliable"]

MemoryMethod = Literal["profiler", "rss", "cuda", "auto"]
METHODS: tuple[str, ...] = ("profiler", "rss", "cuda", "auto")

MALLOC_ENV: dict[str, str] = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc settings under which the ``rss`` method is meaningful (set them before the process starts)."""


def rss_method_reliable() -> bool:
    """True when this process was started with :data:`MALLOC_ENV` (glibc reads it only at start-up)."""
    return all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())


def replay_peak(events: list[tuple[int, int]]) -> int:
    """Peak of the running sum of ``(start_ns, nbytes)`` allocator events in time order, floored at 0 (bytes).

    ``nbytes`` is positive for an allocation and negative for a free. Ties keep the given order (stable sort).
    """
    peak = cur = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line: the rss method needs Linux")


class PeakMemory:
    """Context manager measuring the transient peak memory of its body (see the module docstring).

    Attributes filled on exit (bytes, ``int``):
        ``peak_bytes``: transient peak (peak during the region minus usage at entry), >= 0 for ``profiler``/``rss``.
        ``peak_allocated_bytes``: absolute allocated peak (``cuda`` only, else ``None``).
        ``peak_reserved_bytes``: absolute reserved peak (``cuda`` only, else ``None``).
        ``method``: the resolved method (never ``auto``).
    A body that raises still leaves the attributes filled where possible; the exception propagates.
    """

    def __init__(
        self,
        method: MemoryMethod = "auto",
        *,
        device: torch.device | str | None = None,
        all_reduce: bool = True,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown memory method {method!r}; use one of {', '.join(METHODS)}")
        dev = torch.device(device) if device is not None else None
        if method == "auto":
            is_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
            method = "cuda" if is_cuda else "profiler"
        if method == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("memory method 'cuda' needs a CUDA device; use 'profiler' or 'rss' on CPU")
            dev = (
                dev
                if dev is not None and dev.type == "cuda"
                else torch.device("cuda", torch.cuda.current_device())
            )
        if method == "rss" and not Path("/proc/self/clear_refs").exists():
            raise ValueError("memory method 'rss' needs Linux /proc/self/clear_refs; use 'profiler'")
        self.method: str = method
        self.device = dev
        self.all_reduce = all_reduce
        self.peak_bytes: int | None = None
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None
        self._before = 0
        self._prof: torch.profiler.profile | None = None

    # -------------------------------------------------------------------------------------------- enter
    def __enter__(self) -> PeakMemory:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss":
            # "5" resets the high-water mark to the current RSS, so VmHWM afterwards is this region's peak.
            Path("/proc/self/clear_refs").write_text("5")
            self._before = _proc_status_kib("VmRSS") * 1024
        else:
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=False,
                with_stack=False,
            )
            self._prof.__enter__()
        return self

    # --------------------------------------------------------------------------------------------- exit
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            self.peak_bytes = self.peak_allocated_bytes - self._before
        elif self.method == "rss":
            self.peak_bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self._before)
        else:
            assert self._prof is not None
            self._prof.__exit__(exc_type, exc, tb)
            self.peak_bytes = replay_peak(_memory_events(self._prof))
            self._prof = None  # the event list can be large; drop it now
        if self.all_reduce and exc_type is None:
            self._reduce_max()

    def _reduce_max(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        dev = self.device if self.method == "cuda" else torch.device("cpu")
        for name in ("peak_bytes", "peak_allocated_bytes", "peak_reserved_bytes"):
            value = getattr(self, name)
            if value is None:
                continue
            t = torch.tensor([value], dtype=torch.int64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # each scalar separately, as the reference
            setattr(self, name, int(t.item()))

    @property
    def peak_gib(self) -> float:
        """``peak_bytes`` in GiB (the paper's "GB")."""
        return (self.peak_bytes or 0) / 1024**3


def _memory_events(prof: torch.profiler.profile) -> list[tuple[int, int]]:
    """``(start_ns, nbytes)`` of the CPU allocator's ``[memory]`` events recorded by ``prof``."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() != "[memory]":
            continue
        # Only host allocations: a CUDA run under this profiler would also report device events.
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        out.append((e.start_ns(), e.nbytes()))
    return out
