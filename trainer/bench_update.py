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
from trainer.memory import PeakMemory, rss_method_reliable

__all__ = ["UpdateBenchSpec", "run_update_bench"]


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

    def validate(self) -> None:
        """Raise ``ValueError`` (one readable line) for a bad combination of flags."""
        validate_common(
            self, ("seqs", "prompt_len", "response_len", "rounds", "top_k", "kl_chunk_size", "rep_k")
        )


def _step(
    student: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[], tuple[torch.Tensor, dict]],
    dtype: str,
) -> None:
    """One actor update: forward (autocast as configured), backward, optimizer step; drops the loss."""
    with autocast(dtype):
        loss, _ = loss_fn()
    loss.backward()
    opt.step()
    del loss


def run_update_bench(spec: UpdateBenchSpec, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the benchmark described by ``spec`` and return the result dict (the JSON written by the CLI)."""
    spec.validate()
    with num_threads(spec.threads):
        return _run(spec, log)


def _run(spec: UpdateBenchSpec, log: Callable[[str], None]) -> dict:
    shape = spec.shape
    total_len = spec.prompt_len + spec.response_len
    device = torch.device("cpu")
    env = environment(device)
    student = build_model(shape, spec.seed, total_len).train()
    teacher = build_model(shape, spec.seed + 1, total_len).eval().requires_grad_(False)
    if spec.checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = synthetic_batch(spec.seqs, spec.prompt_len, spec.response_len, shape.vocab, seed=spec.seed + 2)
    opt = make_optimizer(spec.optimizer, list(student.parameters()), spec.lr)
    prime_optimizer(opt)
    n_params = sum(p.numel() for p in student.parameters())
    log(f"student {n_params / 1e6:.1f}M params; batch {tuple(batch.input_ids.shape)}; preparing targets")

    # Targets and denominators once, outside every measured region.
    jobs = {}
    for name in spec.methods:
        obj = make_objective(
            name, shape.layers, rep_layers=spec.rep_layers, rep_positions=spec.rep_positions,
            rep_k=spec.rep_k, top_k=spec.top_k, kl_chunk_size=spec.kl_chunk_size,
        )  # fmt: skip
        with autocast(spec.dtype):
            targets = obj.prepare(student, teacher, batch)
        den = obj.denominators(batch, targets)
        jobs[name] = lambda o=obj, t=targets, d=den: o.loss(student, batch, t, d)
    results = {name: Timings(name) for name in spec.methods}

    def one(name: str, meter: str | None) -> tuple[float, int | None]:
        opt.zero_grad(set_to_none=True)  # the grads' allocation belongs to the measured step
        gc.collect()
        t0 = time.perf_counter()
        if meter is None:
            _step(student, opt, jobs[name], spec.dtype)
            return time.perf_counter() - t0, None
        with PeakMemory(meter) as pm:
            _step(student, opt, jobs[name], spec.dtype)
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
            dt, rss = one(name, "rss")
            results[name].step_seconds.append(dt)
            results[name].rss_peak_bytes.append(rss)
            log(f"round {r + 1}/{spec.rounds} {name}: {dt:.2f}s")

    rows = []
    for name in spec.methods:
        d = results[name].as_dict()
        d["median_step_seconds"] = median(d["step_seconds"])
        d["median_rss_peak_bytes"] = median(d["rss_peak_bytes"])
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
        "rounds": spec.rounds,
        "warmup": spec.warmup,
        "oprd": {"layers": spec.rep_layers, "positions": spec.rep_positions, "k": spec.rep_k},
        "top_k": spec.top_k,
        "kl_chunk_size": spec.kl_chunk_size,
        "memory_method": "profiler",
        "rss_reliable": rss_method_reliable(),
        **env,
        "loadavg_end": env_end.get("loadavg_start"),
        "methods": rows,
    }
