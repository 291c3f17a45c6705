"""Shared pieces of the actor-update and whole-step benchmarks (``oprd-ci bench update|step``).

What is measured is the trainer's own code: :class:`trainer.objectives.Objective` (``prepare`` / ``loss``) for every
distillation method, plus a *floor* that runs the same backbone forward/backward with a trivial loss on the final
hidden states and no LM head. Models are config-built Qwen2 (random init, nothing downloaded).

Method names (``METHODS``):

===================  ============================================================================================
``oprd``             OPRD rep-only (``distill.rep.layers``/``positions`` from the spec, ``all``/``all`` by default)
``opd_sampled``      sampled-token OPD ("OPD top-1")
``opd_topk``         top-k OPD (k = 16 by default: "OPD top-16"), the reference point of the ratios
``full_kl``          full-vocabulary reverse KL, plain (``[N, V]`` logits for student and teacher)
``full_kl_chunked``  full-vocabulary reverse KL, token-chunked and checkpointed
``floor``            backbone forward/backward + optimizer with a trivial loss on the final states
===================  ============================================================================================

Conventions of the result JSON: bytes, seconds, ratios as plain floats; time ratios are the median over rounds of
the per-round paired ratio (methods run round-robin, so a slow patch of a shared machine hits every method of that
round); memory ratios are ratios of the (deterministic) profiler peaks.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import transformers
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.bench_names import DTYPES, METHODS, OPTIMIZERS
from trainer.config import DistillConfig, LayerMode, OPDConfig, PositionMode, RepConfig
from trainer.hidden import capture_hidden_states, layer_indices, num_decoder_layers
from trainer.models import LayerPlan
from trainer.objectives import Denominators, Objective, Targets
from trainer.rollout import RolloutBatch, build_rollout_batch

__all__ = [
    "METHODS",
    "OPTIMIZERS",
    "FloorObjective",
    "ModelShape",
    "autocast",
    "build_model",
    "environment",
    "make_objective",
    "make_optimizer",
    "median",
    "paired_ratio",
    "prime_optimizer",
    "synthetic_batch",
    "with_ratios",
]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
"""Special ids of the synthetic models; random content tokens are drawn from ``[3, V)``."""


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a config-built Qwen2 (defaults: the Qwen2.5-0.5B width at 4 layers, tied, 195.8M params)."""

    vocab: int = 151_936
    hidden: int = 896
    intermediate: int = 4864
    layers: int = 4
    heads: int = 14
    kv_heads: int = 2
    tied: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with one readable line for an impossible shape."""
        for name in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.vocab < 4:
            raise ValueError(f"--vocab must be >= 4 (3 special ids + content), got {self.vocab}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden ({self.hidden}) must be divisible by --heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head dim hidden/heads = {self.hidden // self.heads} must be even (RoPE)")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be divisible by --kv-heads ({self.kv_heads})")


def build_model(
    shape: ModelShape, seed: int, max_positions: int, device: torch.device | str = "cpu"
) -> Qwen2ForCausalLM:
    """A random-init fp32 Qwen2 CausalLM of ``shape`` (SDPA attention, deterministic for a seed and device),
    built directly on ``device`` (initializing 1.5B parameters on the CPU first would take minutes)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=max(max_positions, 32),
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        return Qwen2ForCausalLM(cfg)


def synthetic_batch(
    seqs: int, prompt_len: int, response_len: int, vocab: int, *, seed: int = 0
) -> RolloutBatch:
    """A fixed "rollout" of random tokens in the trainer's layout (see :mod:`trainer.rollout`).

    Even rows: a full prompt and a response of ``response_len`` tokens without EOS (fully valid). Odd rows: a prompt
    left-padded by a quarter of its width and a response that ends with EOS at 3/4 of ``response_len``, so both
    paddings and the response mask are exercised. Shapes: ``input_ids [seqs, prompt_len + response_len]``.
    """
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (seqs, prompt_len), generator=g)
    prompt_mask = torch.ones(seqs, prompt_len, dtype=torch.long)
    responses = torch.randint(3, vocab, (seqs, response_len), generator=g)
    for row in range(1, seqs, 2):
        pad = prompt_len // 4
        prompts[row, :pad] = PAD_ID
        prompt_mask[row, :pad] = 0
        responses[row, max(0, (3 * response_len) // 4 - 1)] = EOS_ID
    return build_rollout_batch(
        prompts, prompt_mask, responses, torch.arange(seqs), eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )


# ------------------------------------------------------------------------------------------------ methods
class FloorObjective:
    """The cost floor: backbone forward/backward (no LM head, final states only) + the same optimizer step.

    Same interface as :class:`Objective`. The loss is ``token-mean(||h_L||^2 / D)`` over valid response slots,
    trivial but it touches every backbone parameter's gradient.
    """

    method = "floor"

    def prepare(self, student: nn.Module, teacher: nn.Module, batch: RolloutBatch) -> Targets:
        return Targets()

    def denominators(self, batch: RolloutBatch, targets: Targets | None = None) -> Denominators:
        n = batch.response_mask.sum().float()
        return Denominators(selected=n, response=n, sequences=(batch.response_mask.sum(-1) > 0).sum().float())

    def loss(
        self, student: nn.Module, batch: RolloutBatch, targets: Targets, den: Denominators
    ) -> tuple[Tensor, dict[str, float]]:
        s = capture_hidden_states(
            student, batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask,
            [num_decoder_layers(student)], "all",
        )  # fmt: skip
        err = s.states.float().pow(2).mean(dim=-1)[:, 0]  # [B, R]
        loss = (err * s.mask.float()).sum() / den.response.clamp(min=1.0)
        return loss, {"loss/total": loss.item()}


def make_objective(
    method: str,
    n_layers: int,
    *,
    rep_layers: LayerMode | list[int] = "all",
    rep_positions: PositionMode = "all",
    rep_k: int = 2000,
    top_k: int = 16,
    kl_chunk_size: int = 256,
) -> Objective | FloorObjective:
    """The trainer's objective for a benchmark method name (student and teacher have the same depth).

    OPD methods run with ``monitor_cosine=False`` (their cosine monitor would add a state capture the baselines do
    not need); OPRD keeps its per-layer cosine metrics, as in training.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "floor":
        return FloorObjective()
    name = "full_kl" if method.startswith("full_kl") else method
    cfg = DistillConfig(
        method=name,
        rep=RepConfig(layers=rep_layers, positions=rep_positions, k=rep_k),
        opd=OPDConfig(top_k=top_k, kl_chunk_size=kl_chunk_size),
    )
    idx = layer_indices(n_layers, rep_layers)
    plan = LayerPlan(student=idx, teacher=idx)
    return Objective(cfg, plan, monitor_cosine=method == "oprd", chunked_kl=method == "full_kl_chunked")


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"oprd,opd_topk"`` (or a list) -> validated, de-duplicated method names in the given order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in items:
        m = raw.strip().replace("-", "_")
        if not m:
            continue
        if m not in METHODS:
            raise ValueError(f"unknown method {raw.strip()!r}; choose from {', '.join(METHODS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    return out


def validate_common(spec, positive: Sequence[str]) -> None:
    """Checks both bench specs share: the model shape, counts that must be >= 1 (``positive`` field names),
    non-negative warm-up/threads, known dtype and optimizer, top-k below the vocabulary; normalizes ``methods``.
    Raises ``ValueError`` naming the flag."""
    spec.shape.validate()
    for name in positive:
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    if spec.warmup < 0 or spec.threads < 0:
        raise ValueError("--warmup and --threads must be >= 0")
    if spec.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {spec.dtype!r}; choose from {', '.join(DTYPES)}")
    if spec.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if spec.top_k >= spec.shape.vocab:
        raise ValueError(f"--top-k ({spec.top_k}) must be smaller than --vocab ({spec.shape.vocab})")
    spec.methods = parse_methods(spec.methods)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW in one of its three implementations: ``adamw-fused`` (one kernel, no ``[P]``-sized temporaries),
    ``adamw-foreach`` (multi-tensor: temporaries the size of all params) or ``adamw`` (single-tensor loop:
    temporaries the size of the largest param, the CPU default)."""
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=lr, foreach=True, fused=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, foreach=False, fused=False)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def prime_optimizer(opt: torch.optim.Optimizer) -> None:
    """Allocate the optimizer's state (Adam moments) outside any measured region.

    One ``step()`` with all-zero gradients: Adam's update is 0 then (only weight decay scales the weights by
    ``1 - lr * wd``), so the weights are unchanged for practical purposes, and the first measured step no longer
    pays the one-off ``2 x params`` state allocation the reference's steady-state steps do not have.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def autocast(dtype: str, device: str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (``cpu``/``cuda``) for ``bf16``; a no-op for ``fp32``."""
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    if dtype == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown dtype {dtype!r}; choose fp32 or bf16")


# -------------------------------------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median over rounds of ``a[r] / b[r]`` (paired: the same round shares the machine's load)."""
    pairs = [x / y for x, y in zip(a, b, strict=True) if y > 0]
    return statistics.median(pairs) if pairs else None


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def with_ratios(rows: list[dict], time_key: str = "step_seconds", mem_key: str = "peak_memory_bytes") -> None:
    """Add ``mem_vs_opd_topk``, ``time_vs_opd_topk``, ``mem_vs_floor``, ``time_vs_floor`` (None when the
    reference method was not run) to each row in place."""
    by_name = {r["name"]: r for r in rows}
    for ref, suffix in (("opd_topk", "opd_topk"), ("floor", "floor")):
        base = by_name.get(ref)
        for r in rows:
            r[f"mem_vs_{suffix}"] = _safe_ratio(r[mem_key], base[mem_key]) if base else None
            r[f"time_vs_{suffix}"] = paired_ratio(r[time_key], base[time_key]) if base else None


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """Fields common to both result JSONs: device, versions, CPU, threads, load average at call time."""
    env = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        env["loadavg_start"] = list(os.getloadavg())
    return env


@dataclass
class Timings:
    """Per-method collected samples of one benchmark run (lists indexed by timed round)."""

    name: str
    step_seconds: list[float] = field(default_factory=list)
    rss_peak_bytes: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    profiled_step_seconds: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (``n <= 0``: leave as is)."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
