"""``oprd-ci bench update``: the actor update alone, per distillation method.

One fixed synthetic rollout batch; every method's teacher targets (and the student's old-log-prob / top-k pass for
the OPD methods) are prepared **once, before anything is measured**. The measured region of one step is exactly
what the trainer's update runs: ``Objective.loss`` (student forward with grad), ``backward()`` and
``optimizer.step()``, with gradients set to ``None`` just before the region (so allocating them counts) and the
loss tensor dropped inside it (``Objective.loss`` keeps no Python reference to logits once it returns).

All methods share one student and one optimizer (a tiny learning rate keeps the weights sane): the persistent state
(weights, Adam moments, targets) is identical for every method, so the *transient* peaks are comparable.

Schedule (round-robin over methods in every phase, so machine noise spreads over all of them):

0. the Adam moments are allocated before anything is measured (:func:`trainer.bench.prime_optimizer`);
1. ``warmup`` rounds (default 0), discarded;
2. one profiled round: the transient peak by the allocator-exact profiler replay (``peak_memory_bytes``); its step
   time carries the profiler's overhead and is reported apart (``profiled_step_seconds``). Being the first run
   of each method, it is also the warm-up of the timed rounds (one-off kernel initialisation lands here);
3. ``rounds`` timed rounds without profiler (``step_seconds``); each is also wrapped in the almost free ``rss``
   meter (``rss_peak_bytes``), meaningful only when the process started with ``MALLOC_ENV`` (``rss_reliable``).

**Micro-batched update** (``micro_batch_tokens`` set, ``--micro-batch-tokens``): the measured region is then the
trainer's whole micro-batched update (:func:`trainer.microbatch.accumulate_update` + ``optimizer.step``): per
micro-batch the no-grad passes (teacher states / old log-probs / top-k), the student forward and backward. The
targets are *not* prepared up front, because with micro-batching they are computed inside the update. ``0`` in a
sweep means one micro-batch measured the same way (targets inside the region), the fair baseline.

**Memory sweep** (:func:`run_memory_sweep`, ``--sequences 2,4,8,16``): for every number of sequences per rank, every
micro-batch budget and every method, one profiled micro-batched update (memory only; its wall time is reported as
``profiled_step_seconds`` and carries the profiler's overhead).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from trainer.bench import (
    ModelShape,
    Timings,
    autocast,
    build_model,
    environment,
    make_objective,
    make_optimizer,
    median,
    num_threads,
    prime_optimizer,
    synthetic_batch,
    validate_common,
    with_ratios,
)
from trainer.config import LayerMode, PositionMode
from trainer.distributed import enable_activation_checkpointing
from trainer.memory import PeakMemory, rss_method_reliable
from trainer.microbatch import accumulate_update, micro_batches

__all__ = ["UpdateBenchSpec", "run_memory_sweep", "run_update_bench"]


@dataclass
class UpdateBenchSpec:
    """Everything ``bench update`` varies. Sizes are counts (tokens, sequences); ``lr`` is the AdamW step size."""

    shape: ModelShape = field(default_factory=ModelShape)
    seqs: int = 2
    prompt_len: int = 64
    response_len: int = 1024
    dtype: str = "fp32"
    optimizer: str = "adamw-fused"
    checkpointing: bool = False
    rounds: int = 3
    warmup: int = 0
    methods: list[str] = field(default_factory=lambda: ["oprd", "opd_sampled", "opd_topk", "full_kl",
                                                        "full_kl_chunked", "floor"])  # fmt: skip
    rep_layers: LayerMode | list[int] = "all"
    rep_positions: PositionMode = "all"
    rep_k: int = 2000
    top_k: int = 16
    kl_chunk_size: int = 256
    threads: int = 0
    lr: float = 1e-6
    seed: int = 0
    micro_batch_tokens: int | None = None
    """Token budget per micro-batch (``None``: the classic single-batch update with targets prepared outside)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (``scripts/gpu-check.sh``); memory is then the §8 CUDA ∆peak."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one readable line) for a bad combination of flags."""
        validate_common(
            self, ("seqs", "prompt_len", "response_len", "rounds", "top_k", "kl_chunk_size", "rep_k")
        )
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"--micro-batch-tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch")


def _step(
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[], tuple[torch.Tensor, dict]],
    dtype: str,
    device: str = "cpu",
) -> None:
    """One actor update: forward (autocast as configured), backward, optimizer step; drops the loss."""
    with autocast(dtype, device):
        loss, _ = loss_fn()
    loss.backward()
    opt.step()
    del loss


def run_update_bench(spec: UpdateBenchSpec, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the benchmark described by ``spec`` and return the result dict (the JSON written by the CLI)."""
    spec.validate()
    with num_threads(spec.threads):
        return _run(spec, log)


def _models(spec: UpdateBenchSpec, total_len: int):
    device = torch.device(spec.device)
    student = build_model(spec.shape, spec.seed, total_len, device).train()
    teacher = build_model(spec.shape, spec.seed + 1, total_len, device).eval().requires_grad_(False)
    if spec.checkpointing:
        enable_activation_checkpointing(student)
    opt = make_optimizer(spec.optimizer, list(student.parameters()), spec.lr)
    prime_optimizer(opt)
    return device, student, teacher, opt


def _objective(spec: UpdateBenchSpec, name: str):
    return make_objective(
        name, spec.shape.layers, rep_layers=spec.rep_layers, rep_positions=spec.rep_positions,
        rep_k=spec.rep_k, top_k=spec.top_k, kl_chunk_size=spec.kl_chunk_size,
    )  # fmt: skip


def _micro_job(spec, obj, student, teacher, batch, budget: int | None) -> Callable[[], int]:
    """The trainer's micro-batched update of ``batch`` (targets inside) minus the optimizer step; returns the
    number of micro-batches."""
    den = obj.denominators(batch)

    def job() -> int:
        upd = accumulate_update(
            obj,
            student,
            teacher,
            micro_batches(batch, budget),
            den,
            autocast=lambda: autocast(spec.dtype, spec.device),
        )
        return upd.micro_batches

    return job


def _meter(spec: UpdateBenchSpec, meter: str) -> PeakMemory:
    # On CUDA the §8 protocol (max_memory_allocated delta) replaces the CPU profiler replay.
    return PeakMemory("cuda" if spec.device == "cuda" and meter == "profiler" else meter, all_reduce=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(spec: UpdateBenchSpec, log: Callable[[str], None]) -> dict:
    shape = spec.shape
    total_len = spec.prompt_len + spec.response_len
    device, student, teacher, opt = _models(spec, total_len)
    env = environment(device)
    batch = synthetic_batch(spec.seqs, spec.prompt_len, spec.response_len, shape.vocab, seed=spec.seed + 2)
    batch = batch.to(device)
    n_params = sum(p.numel() for p in student.parameters())
    log(f"student {n_params / 1e6:.1f}M params; batch {tuple(batch.input_ids.shape)}; preparing targets")

    jobs = {}
    for name in spec.methods:
        obj = _objective(spec, name)
        if spec.micro_batch_tokens is not None:
            # Micro-batched: the targets are computed per micro-batch inside the measured update.
            mj = _micro_job(spec, obj, student, teacher, batch, spec.micro_batch_tokens)
            jobs[name] = mj
            continue
        # Targets and denominators once, outside every measured region.
        with autocast(spec.dtype, spec.device):
            targets = obj.prepare(student, teacher, batch)
        den = obj.denominators(batch, targets)
        jobs[name] = lambda o=obj, t=targets, d=den: o.loss(student, batch, t, d)
    results = {name: Timings(name) for name in spec.methods}

    def run_job(name: str) -> None:
        if spec.micro_batch_tokens is not None:
            results[name].extra["micro_batches"] = jobs[name]()
            opt.step()
        else:
            _step(student, opt, jobs[name], spec.dtype, spec.device)
        _sync(device)

    def one(name: str, meter: str | None) -> tuple[float, int | None]:
        opt.zero_grad(set_to_none=True)  # the grads' allocation belongs to the measured step
        gc.collect()
        t0 = time.perf_counter()
        if meter is None:
            run_job(name)
            return time.perf_counter() - t0, None
        with _meter(spec, meter) as pm:
            run_job(name)
        return time.perf_counter() - t0, pm.peak_bytes

    for r in range(spec.warmup):
        for name in spec.methods:
            dt, _ = one(name, None)
            log(f"warm-up {r + 1}/{spec.warmup} {name}: {dt:.2f}s")
    for name in spec.methods:
        dt, peak = one(name, "profiler")
        results[name].peak_memory_bytes = peak
        results[name].profiled_step_seconds = dt
        log(f"profiled {name}: peak {peak / 2**30:.3f} GiB ({dt:.2f}s with profiler)")
    for r in range(spec.rounds):
        for name in spec.methods:
            dt, rss = one(name, "rss" if spec.device == "cpu" else None)
            results[name].step_seconds.append(dt)
            results[name].rss_peak_bytes.append(rss)
            log(f"round {r + 1}/{spec.rounds} {name}: {dt:.2f}s")

    rows = []
    for name in spec.methods:
        d = results[name].as_dict()
        d["median_step_seconds"] = median(d["step_seconds"])
        d["median_rss_peak_bytes"] = median([b for b in d["rss_peak_bytes"] if b is not None])
        rows.append(d)
    with_ratios(rows)
    spec_dict = asdict(spec)
    out_shape = {
        **spec_dict.pop("shape"), "params": n_params, "seqs": spec.seqs, "prompt_len": spec.prompt_len,
        "response_len": spec.response_len, "response_tokens": int(batch.response_mask.sum()),
    }  # fmt: skip
    env_end = environment(device)
    return {
        "benchmark": "update",
        "shape": out_shape,
        "dtype": spec.dtype,
        "optimizer": spec.optimizer,
        "checkpointing": spec.checkpointing,
        "micro_batch_tokens": spec.micro_batch_tokens,
        "targets_in_region": spec.micro_batch_tokens is not None,
        "rounds": spec.rounds,
        "warmup": spec.warmup,
        "oprd": {"layers": spec.rep_layers, "positions": spec.rep_positions, "k": spec.rep_k},
        "top_k": spec.top_k,
        "kl_chunk_size": spec.kl_chunk_size,
        "memory_method": "cuda" if spec.device == "cuda" else "profiler",
        "rss_reliable": rss_method_reliable(),
        **env,
        "loadavg_end": env_end.get("loadavg_start"),
        "methods": rows,
    }


def run_memory_sweep(
    spec: UpdateBenchSpec,
    sequences: list[int],
    budgets: list[int | None],
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Update peak memory against sequences per rank, per micro-batch budget (``None`` = one micro-batch) and
    method: one profiled micro-batched update per cell, targets inside the region (see the module docstring).

    ``spec.seqs``, ``spec.micro_batch_tokens``, ``rounds`` and ``warmup`` are ignored. Cells run smallest batch
    first; a cell whose update raises (e.g. out of memory) is recorded with its error and the sweep goes on.
    """
    spec.validate()
    if not sequences or any(n < 1 for n in sequences):
        raise ValueError(f"--sequences must be positive counts, got {sequences}")
    if any(b is not None and b < 1 for b in budgets) or not budgets:
        raise ValueError(f"--micro-batch-tokens must be 'none'/0 or positive counts, got {budgets}")
    with num_threads(spec.threads):
        total_len = spec.prompt_len + spec.response_len
        device, student, teacher, opt = _models(spec, total_len)
        env = environment(device)
        n_params = sum(p.numel() for p in student.parameters())
        rows = []
        for seqs in sorted(sequences):
            batch = synthetic_batch(
                seqs, spec.prompt_len, spec.response_len, spec.shape.vocab, seed=spec.seed + 2
            )
            batch = batch.to(device)
            for budget in budgets:
                for name in spec.methods:
                    job = _micro_job(spec, _objective(spec, name), student, teacher, batch, budget)
                    opt.zero_grad(set_to_none=True)
                    gc.collect()
                    row = {"seqs": seqs, "micro_batch_tokens": budget, "method": name,
                           "response_tokens": int(batch.response_mask.sum())}  # fmt: skip
                    t0 = time.perf_counter()
                    try:
                        with _meter(spec, "profiler") as pm:
                            row["micro_batches"] = job()
                            opt.step()
                            _sync(device)
                        row["peak_memory_bytes"] = pm.peak_bytes
                    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        row["peak_memory_bytes"] = None
                    row["profiled_step_seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    peak = row["peak_memory_bytes"]
                    log(
                        f"seqs {seqs} budget {budget} {name}: "
                        + (f"{peak / 2**30:.3f} GiB" if peak is not None else row["error"])
                        + f" ({row['profiled_step_seconds']:.1f}s, {row.get('micro_batches', '-')} micro-batches)"
                    )
        spec_dict = asdict(spec)
        env_end = environment(device)
        return {
            "benchmark": "update-sweep",
            "shape": {
                **spec_dict.pop("shape"),
                "params": n_params,
                "prompt_len": spec.prompt_len,
                "response_len": spec.response_len,
            },
            "sequences": sorted(sequences),
            "micro_batch_tokens": budgets,
            "dtype": spec.dtype,
            "optimizer": spec.optimizer,
            "checkpointing": spec.checkpointing,
            "oprd": {"layers": spec.rep_layers, "positions": spec.rep_positions, "k": spec.rep_k},
            "top_k": spec.top_k,
            "memory_method": "cuda" if spec.device == "cuda" else "profiler",
            "targets_in_region": True,
            **env,
            "loadavg_end": env_end.get("loadavg_start"),
            "cells": rows,
        }
