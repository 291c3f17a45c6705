"""``oprd-ci bench step``: a whole on-policy step per method on a small config-built pair, phase by phase.

Phases of one step (seconds each, plus ``total``):

``rollout``       real sampling from the student: :class:`trainer.rollout.HFGenerateEngine` (``engine="hf"``, KV
                  cache) or a colocated :class:`trainer.rollout_vllm.VLLMEngine` (``engine="vllm"``);
``old_logprob``   the student's no-grad log-prob / top-k pass inside ``Objective.prepare`` (OPD methods only:
                  OPRD and the full-KL/floor variants have none, so it reads ~0);
``teacher``       the teacher's no-grad pass inside ``Objective.prepare`` (OPRD: hidden states only, no logits);
``update``        ``Objective.loss`` + ``backward`` + ``optimizer.step`` with grads set to ``None`` first;
``sync``          ``engine.load_weights(student)`` after the step (vLLM: the full state dict pushed into the
                  engine, in-process by reference or through shared memory / a file; HF: nothing to do, ~0).

The result records the 1-minute load average at the start and end and at each timed round (``loadavg_rounds``):
on a shared machine the absolute times follow it.

Per method the result also carries ``rollout_tokens_per_second`` (valid response tokens / rollout seconds, median);
the engine's start-up time is measured once (``engine.startup_seconds``).

``prepare`` runs the student pass first and then the teacher pass, so the split point is the first teacher forward
(a forward pre-hook records the time); the two phases add up to ``prepare`` exactly.

Teacher placement (``teachers``, e.g. ``local,ray:1,ray:2``): with any ``ray:<replicas>`` entry every method runs once
per placement (rows ``<method>@<placement>``) through the trainer's micro-batched update
(:func:`trainer.microbatch.accumulate_update`, ``micro_batch_tokens``): ``local`` prepares each micro-batch in
process right before its update; ``ray:<n>`` submits each micro-batch's request to a :class:`trainer.teacher_pool.
TeacherPool` of ``n`` replicas as the rollout finishes its rows (:class:`trainer.microbatch.MicroBatchStream`, as
the trainer does; ``teacher_requests_during_rollout`` counts those sent while rows were still sampled) and consumes
the replies in order, so the replicas compute while the engine and the student work. ``teacher`` is then the time
spent sending plus the time the step *waited* for targets (old-log-prob passes included, ``old_logprob`` reads 0)
and ``update`` the rest of the update; each such row also carries the step's payload
(``teacher_reply_bytes``: states + mask + log-probs received; ``teacher_request_bytes``; ``teacher_reference_bytes``:
the reference's layout, fp32 at every selected position for all planned layers), and the result carries the
same comparison at the paper's shape (``payload_paper_shape``).

Methods run round-robin each round, every method on a rollout sampled with the same seed (one shared student and
optimizer with a tiny learning rate, so the samples stay the same up to rounding). The update's transient peak
(``peak_memory_bytes``, profiler replay) is measured in one extra profiled round after the warm-up; the timed rounds
run without the profiler.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainer.bench import (
    EOS_ID,
    PAD_ID,
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
    validate_common,
    with_ratios,
)
from trainer.memory import PeakMemory
from trainer.microbatch import accumulate_update, micro_batches, teacher_request_stream
from trainer.rollout import HFGenerateEngine
from trainer.teacher import reference_nbytes

__all__ = ["PHASES", "StepBenchSpec", "run_step_bench"]

PHASES: tuple[str, ...] = ("rollout", "old_logprob", "teacher", "update", "sync", "total")


def _small_shape() -> ModelShape:
    return ModelShape(vocab=151_936, hidden=192, intermediate=512, layers=2, heads=4, kv_heads=2)


@dataclass
class StepBenchSpec:
    """Everything ``bench step`` varies (counts of prompts/tokens; ``temperature``/``top_p`` of the sampler)."""

    shape: ModelShape = field(default_factory=_small_shape)
    prompts: int = 4
    n: int = 2
    prompt_len: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "fp32"
    optimizer: str = "adamw-fused"
    rounds: int = 3
    warmup: int = 0
    methods: list[str] = field(default_factory=lambda: ["oprd", "opd_sampled", "opd_topk", "full_kl",
                                                        "full_kl_chunked", "floor"])  # fmt: skip
    top_k: int = 16
    kl_chunk_size: int = 256
    threads: int = 0
    lr: float = 1e-6
    seed: int = 0
    engine: str = "hf"
    """``hf`` or ``vllm`` (the rollout engine; vLLM via its in-process or multiprocessing engine)."""
    vllm_multiprocessing: bool = True
    teachers: list[str] = field(default_factory=lambda: ["local"])
    """Teacher placements: ``local`` and/or ``ray:<replicas>`` (see the module docstring)."""
    micro_batch_tokens: int | None = None
    """Token budget of one micro-batch when teacher placements are compared (``None``: one micro-batch)."""

    def pools(self) -> dict[str, int]:
        """``{"ray:2": 2, ...}``: the Ray placements and their replica counts."""
        return {t: int(t.split(":", 1)[1]) for t in self.teachers if t != "local"}

    vllm_sync: str = "direct"
    """The engine's sync route (``VLLMEngine.sync_route``): ``direct`` (the model's loaders, one re-pack per
    layer; the default), ``reload`` (vLLM's layerwise reload) or ``file`` (multiprocessing only: a safetensors
    file per sync and ``reload``, the first route)."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one readable line) for a bad combination of flags."""
        for t in self.teachers:
            if t != "local" and not (t.startswith("ray:") and t[4:].isdigit() and int(t[4:]) > 0):
                raise ValueError(f"--teachers entries are local or ray:<replicas>, got {t!r}")
        if self.pools():
            bad = [m for m in self.methods if m not in ("oprd", "opd_sampled", "opd_topk", "combined")]
            if bad:
                raise ValueError(f"a ray teacher serves oprd / opd_sampled / opd_topk / combined, not {bad}")
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.vllm_sync not in ("direct", "reload", "file"):
            raise ValueError(f"--vllm-sync must be direct, reload or file, got {self.vllm_sync!r}")
        if self.vllm_sync == "file" and not self.vllm_multiprocessing:
            raise ValueError("--vllm-sync file needs the multiprocessing engine (drop --vllm-inprocess)")
        if self.engine == "vllm" and self.dtype != "fp32":
            raise ValueError("--engine vllm samples in the student's dtype: use --dtype fp32")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be > 0 (on-policy sampling) and --top-p in (0, 1]")
        validate_common(
            self, ("prompts", "n", "prompt_len", "max_new_tokens", "rounds", "top_k", "kl_chunk_size")
        )


class _TeacherClock:
    """Records the time of the teacher's first forward call after :meth:`arm` (a forward pre-hook)."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.t: float | None = None
        self._handle = teacher.register_forward_pre_hook(self._hook)

    def _hook(self, *_args) -> None:
        if self.t is None:
            self.t = time.perf_counter()

    def arm(self) -> None:
        self.t = None

    def close(self) -> None:
        self._handle.remove()


def run_step_bench(spec: StepBenchSpec, log: Callable[[str], None] = lambda _m: None) -> dict:
    """Run the benchmark described by ``spec`` and return the result dict (the JSON written by the CLI)."""
    spec.validate()
    with num_threads(spec.threads):
        return _run(spec, log)


def _run(spec: StepBenchSpec, log: Callable[[str], None]) -> dict:
    shape = spec.shape
    max_len = spec.prompt_len + spec.max_new_tokens
    env = environment(torch.device("cpu"))
    student = build_model(shape, spec.seed, max_len).train()
    teacher = build_model(shape, spec.seed + 1, max_len).eval().requires_grad_(False)
    opt = make_optimizer(spec.optimizer, list(student.parameters()), spec.lr)
    prime_optimizer(opt)
    startup = 0.0
    if spec.engine == "vllm":
        from trainer.config import VLLMConfig
        from trainer.rollout_vllm import VLLMEngine

        engine = VLLMEngine(
            student, VLLMConfig(multiprocessing=spec.vllm_multiprocessing), pad_token_id=PAD_ID,
            eos_token_id=EOS_ID, seed=spec.seed,
        )  # fmt: skip
        if spec.vllm_sync != "direct" or engine.sync_route == "direct":  # else: direct unavailable, reload
            engine.sync_route = spec.vllm_sync
        startup = engine.startup_seconds
        log(f"vLLM {engine.version} engine up in {startup:.1f}s")
        engine_version = engine.version
    else:
        import transformers

        engine = HFGenerateEngine(pad_token_id=PAD_ID, eos_token_id=EOS_ID)
        engine_version = transformers.__version__
    g = torch.Generator().manual_seed(spec.seed + 2)
    # Prompts of varying length (left padding exercised), random content ids in [3, V).
    prompts = [
        torch.randint(3, shape.vocab, (spec.prompt_len - (i % 3),), generator=g).tolist()
        for i in range(spec.prompts)
    ]
    objectives = {
        m: make_objective(m, shape.layers, top_k=spec.top_k, kl_chunk_size=spec.kl_chunk_size)
        for m in spec.methods
    }
    clock = _TeacherClock(teacher)
    pools = _start_pools(spec, teacher, log) if spec.pools() else {}
    labels = (
        [(m, t) for m in spec.methods for t in spec.teachers]
        if pools
        else [(m, "local") for m in spec.methods]
    )
    name = {(m, t): (f"{m}@{t}" if pools else m) for m, t in labels}
    results = {
        name[lt]: Timings(name[lt], extra={p: [] for p in (*PHASES, "rollout_tokens", *_PAYLOAD)})
        for lt in labels
    }

    def placed(method: str, where: str, round_seed: int, meter: str | None):
        """One step through the trainer's micro-batched update with the teacher at ``where``."""
        obj = objectives[method]
        backend = teacher if where == "local" else pools[where]
        before = dict(backend.stats) if where != "local" else None
        stream = None
        if where != "local":  # as the trainer does: requests go out as the rollout finishes rows
            stream = teacher_request_stream(
                obj, student, backend, prompts, spec.n, pad_token_id=engine.pad_token_id,
                eos_token_id=engine.eos_token_id, max_tokens=spec.micro_batch_tokens,
                autocast=lambda: autocast(spec.dtype),
            )  # fmt: skip
        t0 = time.perf_counter()
        torch.manual_seed(round_seed)
        with autocast(spec.dtype):
            batch = engine.generate(
                student, prompts, n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens, on_progress=stream.progress if stream is not None else None,
            )  # fmt: skip
        if stream is not None:
            micro, pending = stream.finish(batch)
        else:
            micro, pending = micro_batches(batch, spec.micro_batch_tokens), None
        t2 = time.perf_counter()
        sent = stream.submit_seconds if stream is not None else 0.0
        den = obj.denominators(batch)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        t3 = time.perf_counter()
        with PeakMemory(meter) if meter else _null() as pm:
            upd = accumulate_update(
                obj, student, backend, micro, den, autocast=lambda: autocast(spec.dtype), pending=pending
            )
            opt.step()
        t4 = time.perf_counter()
        engine.load_weights(student)
        t5 = time.perf_counter()
        phases = {
            "rollout": t2 - t0 - sent, "old_logprob": 0.0, "teacher": upd.prepare_seconds + sent,
            "update": t4 - t3 - upd.prepare_seconds, "sync": t5 - t4, "total": (t2 - t0) + (t5 - t3),
            "rollout_tokens": float(batch.response_lengths.sum()),
            "teacher_requests_during_rollout": float(stream.submitted_early if stream is not None else 0),
        }  # fmt: skip
        if before is not None:
            phases["teacher_reply_bytes"] = backend.stats["reply_bytes"] - before["reply_bytes"]
            phases["teacher_request_bytes"] = backend.stats["request_bytes"] - before["request_bytes"]
        else:
            phases["teacher_reply_bytes"] = phases["teacher_request_bytes"] = 0.0
        sel = int(den.selected) if obj.capture_states else 0
        phases["teacher_reference_bytes"] = float(reference_nbytes(sel, len(obj.plan.teacher), shape.hidden))
        return phases, (pm.peak_bytes if meter else None)

    loadavg: list[float] = []  # 1-minute load average at the start of each timed round

    def one(method: str, round_seed: int, meter: str | None) -> tuple[dict[str, float], int | None]:
        obj = objectives[method]
        t0 = time.perf_counter()
        torch.manual_seed(round_seed)  # the same rollout for every method of this round
        with autocast(spec.dtype):
            batch = engine.generate(
                student, prompts, n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                max_new_tokens=spec.max_new_tokens,
            )  # fmt: skip
            t1 = time.perf_counter()
            clock.arm()
            targets = obj.prepare(student, teacher, batch)
            t2 = time.perf_counter()
        t_split = clock.t if clock.t is not None else t2  # no teacher pass (floor): all student-side
        den = obj.denominators(batch, targets)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        t3 = time.perf_counter()
        with PeakMemory(meter) if meter else _null() as pm:
            with autocast(spec.dtype):
                loss, _ = obj.loss(student, batch, targets, den)
            loss.backward()
            opt.step()
            del loss
        t4 = time.perf_counter()
        engine.load_weights(student)  # on-policy: the next rollout samples from the updated student
        t5 = time.perf_counter()
        phases = {
            "rollout": t1 - t0,
            "old_logprob": t_split - t1,
            "teacher": t2 - t_split,
            "update": t4 - t3,
            "sync": t5 - t4,
            "total": (t2 - t0) + (t5 - t3),  # excludes the gc.collect() between phases
            "rollout_tokens": float(batch.response_lengths.sum()),
        }
        return phases, (pm.peak_bytes if meter else None)

    def run(lt: tuple[str, str], round_seed: int, meter: str | None):
        return placed(*lt, round_seed, meter) if pools else one(lt[0], round_seed, meter)

    try:
        for r in range(spec.warmup):
            for lt in labels:
                ph, _ = run(lt, spec.seed + 100 + r, None)
                log(f"warm-up {r + 1}/{spec.warmup} {name[lt]}: {ph['total']:.2f}s")
        for lt in labels:
            ph, peak = run(lt, spec.seed + 99, "profiler")
            results[name[lt]].peak_memory_bytes = peak
            results[name[lt]].profiled_step_seconds = ph["update"]
            log(f"profiled {name[lt]}: update peak {peak / 2**20:.1f} MiB")
        for r in range(spec.rounds):
            loadavg.append(os.getloadavg()[0])
            for lt in labels:
                ph, _ = run(lt, spec.seed + 1000 + r, None)
                for p in (*PHASES, "rollout_tokens", *(_PAYLOAD if pools else ())):
                    results[name[lt]].extra[p].append(ph[p])
                results[name[lt]].step_seconds.append(ph["total"])
                log(
                    f"round {r + 1}/{spec.rounds} {name[lt]}: "
                    + " ".join(f"{p} {ph[p]:.3f}s" for p in PHASES)
                )
    finally:
        clock.close()
        engine.close()
        for pool in pools.values():
            pool.close()

    rows = []
    for lt in labels:
        m = name[lt]
        d = results[m].as_dict()
        d.pop("rss_peak_bytes")
        d["median_step_seconds"] = median(d["step_seconds"])
        tokens = d.pop("rollout_tokens")
        d["phases_median_seconds"] = {p: median(d.pop(p)) for p in PHASES}
        d["rollout_tokens_per_second"] = median(
            [t / s for t, s in zip(tokens, results[m].extra["rollout"], strict=True)]
        )
        d["sync_fraction"] = d["phases_median_seconds"]["sync"] / d["median_step_seconds"]
        d["phase_seconds"] = {p: results[m].extra[p] for p in PHASES}
        for p in _PAYLOAD:
            vals = d.pop(p, None)
            if pools:
                d[p] = median(vals)
        d["teacher"] = lt[1]
        d["has_old_logprob_pass"] = lt[0] in ("opd_sampled", "opd_topk")
        d["builds_logits_in_update"] = lt[0] in ("opd_sampled", "opd_topk", "full_kl", "full_kl_chunked")
        rows.append(d)
    with_ratios(rows)
    spec_dict = asdict(spec)
    n_params = sum(p.numel() for p in student.parameters())
    env_end = environment(torch.device("cpu"))
    return {
        "benchmark": "step",
        "shape": {
            **spec_dict.pop("shape"),
            "params": n_params,
            "prompts": spec.prompts,
            "n": spec.n,
            "prompt_len": spec.prompt_len,
            "max_new_tokens": spec.max_new_tokens,
        },
        "dtype": spec.dtype,
        "optimizer": spec.optimizer,
        "rounds": spec.rounds,
        "warmup": spec.warmup,
        "sampling": {"temperature": spec.temperature, "top_p": spec.top_p},
        "engine": {
            "name": spec.engine,
            "version": engine_version,
            "multiprocessing": spec.vllm_multiprocessing if spec.engine == "vllm" else None,
            "sync_route": engine.sync_route if spec.engine == "vllm" else None,
            "startup_seconds": startup,
        },
        "memory_method": "profiler",
        **env,
        "loadavg_end": env_end.get("loadavg_start"),
        "loadavg_rounds": loadavg,
        "methods": rows,
        **(
            {
                "teachers": spec.teachers,
                "micro_batch_tokens": spec.micro_batch_tokens,
                "payload_paper_shape": paper_shape_payload(),
                "ray_version": __import__("ray").__version__,
            }
            if pools
            else {}
        ),
    }


_PAYLOAD = (
    "teacher_reply_bytes", "teacher_request_bytes", "teacher_reference_bytes", "teacher_requests_during_rollout",
)  # fmt: skip


def paper_shape_payload(hidden: int = 1536, layers: int = 28, tokens: int = 16_384) -> dict:
    """Teacher payload of OPRD at the paper's shape (hidden 1536, all 28 layers planned, ``tokens`` selected
    positions): the pool sends bf16 states (the paper computes in bf16) plus a 1-byte mask per position; the
    reference moves fp32 states. Padding of a compacted width beyond the valid positions is not counted (``all``
    positions are not padded; ``last_k`` pads each row to k)."""
    ref = reference_nbytes(tokens, layers, hidden)
    pool = tokens * layers * hidden * 2 + tokens
    return {"hidden": hidden, "layers": layers, "tokens": tokens, "reference_bytes": ref, "pool_bytes": pool,
            "ratio": pool / ref}  # fmt: skip


def _start_pools(spec: StepBenchSpec, teacher: torch.nn.Module, log: Callable[[str], None]) -> dict:
    """One :class:`TeacherPool` per ``ray:<n>`` placement, over the bench teacher saved to a temporary directory
    (replicas load it from disk, as in training)."""
    import tempfile

    from trainer.config import ModelsConfig, ModelSource, TeacherConfig
    from trainer.teacher import teacher_identity
    from trainer.teacher_pool import TeacherPool

    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    teacher.save_pretrained(tmp, safe_serialization=True)
    models = ModelsConfig(teacher=ModelSource(path=str(tmp)), embedded=False)
    ident = teacher_identity(tmp, teacher)
    import ray

    if (
        not ray.is_initialized()
    ):  # one cluster with room for every pool (a pool alone would size it for itself)
        ray.init(
            address="local", num_cpus=sum(spec.pools().values()), include_dashboard=False, log_to_driver=False
        )
    pools = {}
    for label, n in spec.pools().items():
        t0 = time.perf_counter()
        pools[label] = TeacherPool(TeacherConfig(placement="ray", replicas=n), models, ident)
        log(f"teacher pool {label} up in {time.perf_counter() - t0:.1f}s")
    return pools


class _null:
    """A no-op context manager whose ``as`` target is itself (``peak_bytes`` stays ``None``)."""

    peak_bytes = None

    def __enter__(self) -> _null:
        return self

    def __exit__(self, *_exc) -> None:
        return None
