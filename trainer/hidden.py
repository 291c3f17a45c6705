"""Hidden-state capture and selection with the reference code's semantics (oprd-method.md §2.2, §5.1).

Index conventions follow Hugging Face's ``output_hidden_states`` tuple of length L+1:

* index 0 = embeddings (never selected),
* index 1..L-1 = raw residual-stream outputs of decoder blocks 1..L-1,
* index L = final-norm(output of block L) (what HF returns as ``last_hidden_state``).

Sequences are laid out ``[left-padded prompt | right-padded response]`` and the *response slots* are the last R
positions: slot t holds the hidden state after reading response token t (EOS included), identical for student and
teacher.

Capture never builds a ``[tokens, vocab]`` logits tensor: the CausalLM forward is called (so FSDP2's root hooks
all-gather the embedding / final norm) with ``logits_to_keep`` set to an empty index tensor, which makes the LM
head run on a ``[B, 0, D]`` input. States are sliced to the response slots before any stacking or upcasting;
without grad only the requested layers are ever kept (forward hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import LayerMode, PositionMode

__all__ = [
    "SelectedStates",
    "capture_hidden_states",
    "decoder_parts",
    "layer_indices",
    "num_decoder_layers",
    "position_mask",
    "proportional_layer_map",
    "select_positions",
    "teacher_layer_indices",
]


# ------------------------------------------------------------------------------------------ layer selection
def layer_indices(num_layers: int, mode: LayerMode | Sequence[int]) -> list[int]:
    """HF hidden-state indices selected by ``mode`` for a model with ``num_layers`` decoder blocks.

    ``last`` -> [L]; ``all`` -> 1..L; ``even`` -> 1, 3, 5, ... (0-based even blocks); ``odd`` -> 2, 4, ...
    (includes the normed last layer when L is even). Explicit lists are validated against 1..L.

    >>> layer_indices(4, "even"), layer_indices(4, "odd")
    ([1, 3], [2, 4])
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if isinstance(mode, str):
        if mode == "last":
            return [num_layers]
        if mode == "all":
            return list(range(1, num_layers + 1))
        if mode == "even":
            return [1 + j for j in range(0, num_layers, 2)]
        if mode == "odd":
            return [1 + j for j in range(1, num_layers, 2)]
        raise ValueError(f"unknown layer mode {mode!r}; use last, all, even, odd or a list of indices")
    out = [int(i) for i in mode]
    bad = [i for i in out if not 1 <= i <= num_layers]
    if bad:
        raise ValueError(
            f"layer indices {bad} out of range: HF hidden-state indices run 1..{num_layers} for this model "
            "(0 is the embedding output and is never distilled)"
        )
    return out


def proportional_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Eq. 11: 0-based teacher block for each 0-based student block, ``linspace(0, n_T-1, n_S).round()``.

    Rounding is half-to-even, as ``torch.round``. Identity when depths match; ``n_S=1`` -> ``[n_T-1]``.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"depths must be >= 1, got student {n_student}, teacher {n_teacher}")
    if n_student == 1:
        return [n_teacher - 1]
    grid = torch.linspace(0, n_teacher - 1, n_student, dtype=torch.float64).round()
    return [int(v) for v in grid]


def teacher_layer_indices(student_indices: Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    """Map student HF indices (1..L_S) to teacher HF indices (1..L_T) with the proportional map.

    The student's last index L_S (post-final-norm) maps to the teacher's L_T (also post-final-norm).
    """
    mapping = proportional_layer_map(n_student, n_teacher)
    return [mapping[i - 1] + 1 for i in student_indices]


# --------------------------------------------------------------------------------------- position selection
def _valid_lengths(response_mask: Tensor) -> Tensor:
    return response_mask.to(torch.long).sum(dim=-1)


def position_mask(response_mask: Tensor, mode: PositionMode, k: int = 1) -> Tensor:
    """Boolean ``[B, R]`` mask of the response slots ``mode`` selects (uncompacted; TV1 of oprd-method.md).

    ``response_mask`` is ``[B, R]`` with ones on the valid response tokens (EOS included), right-padded.
    """
    valid = _valid_lengths(response_mask)  # [B]
    r = response_mask.shape[-1]
    t = torch.arange(r, device=response_mask.device).unsqueeze(0)  # [1, R]
    v = valid.unsqueeze(1)
    if mode == "all":
        sel = t < v
    elif mode == "last":
        sel = (t == (v - 1).clamp(min=0)) & (v > 0)
    elif mode == "first_k":
        sel = t < torch.clamp(v, max=k)
    elif mode == "last_k":
        sel = (t >= v - torch.clamp(v, max=k)) & (t < v)
    else:
        raise ValueError(f"unknown position mode {mode!r}; use last, all, last_k or first_k")
    return sel


def select_positions(
    hidden: Tensor, response_mask: Tensor, mode: PositionMode, k: int = 1
) -> tuple[Tensor, Tensor]:
    """Select and compact response slots.

    Args:
        hidden: ``[B, R, D]`` or ``[B, Λ, R, D]`` states at the response slots.
        response_mask: ``[B, R]``, ones on valid response tokens (right-padded).
        mode: ``all`` keeps all R slots (no compaction); ``last`` keeps slot v_b-1 (width 1);
            ``first_k`` / ``last_k`` copy each sample's first/last min(k, v_b) valid slots into a fixed width
            of **k**, left-aligned and zero-padded (the reference's fixed width keeps shapes identical across
            micro-batches).
    Returns:
        ``(states, mask)``: states ``[B, W, D]`` or ``[B, Λ, W, D]`` in the input dtype, mask ``[B, W]`` bool.
        A sample with no valid token gets an all-False mask (and zero states for compacted modes).
    """
    multi = hidden.dim() == 4
    h = hidden if multi else hidden.unsqueeze(1)  # [B, Λ, R, D]
    b, _, r, d = h.shape
    if response_mask.shape != (b, r):
        raise ValueError(f"response_mask shape {tuple(response_mask.shape)} != (B, R) = {(b, r)}")
    if mode == "all":
        mask = response_mask.to(torch.bool)
        out = h
    else:
        valid = _valid_lengths(response_mask)  # [B]
        width = 1 if mode == "last" else k
        if mode == "last":
            n_sel = (valid > 0).to(torch.long)
            start = (valid - 1).clamp(min=0)
        elif mode == "first_k":
            n_sel = valid.clamp(max=k)
            start = torch.zeros_like(valid)
        elif mode == "last_k":
            n_sel = valid.clamp(max=k)
            start = valid - n_sel
        else:
            raise ValueError(f"unknown position mode {mode!r}; use last, all, last_k or first_k")
        j = torch.arange(width, device=h.device).unsqueeze(0)  # [1, W]
        mask = j < n_sel.unsqueeze(1)  # [B, W]
        idx = (start.unsqueeze(1) + j).clamp(max=r - 1)  # [B, W]; padded columns point anywhere valid
        idx = idx.view(b, 1, width, 1).expand(b, h.shape[1], width, d)
        out = torch.gather(h, 2, idx) * mask.view(b, 1, width, 1).to(h.dtype)
    return (out if multi else out.squeeze(1)), mask


# ------------------------------------------------------------------------------------------------- capture
@dataclass
class SelectedStates:
    """Selected hidden states of one forward pass.

    ``states``: ``[B, Λ, W, D]`` in the model's compute dtype (Λ = selected layers, W = selected width).
    ``mask``: ``[B, W]`` bool, the selected valid slots.
    ``layers``: the HF indices of the Λ axis.
    ``logits``: ``[B, R, V]`` next-token logits for the R response tokens when requested, else ``None``.
    """

    states: Tensor
    mask: Tensor
    layers: list[int]
    logits: Tensor | None = None


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The decoder block list and the final norm of an HF CausalLM (Llama/Qwen/Mistral layout)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(backbone, "layers", None)
    norm = next(
        (getattr(backbone, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(backbone, n)), None
    )
    if not isinstance(layers, nn.ModuleList) or norm is None:
        raise TypeError(
            f"{type(model).__name__}: cannot find decoder `layers` and a final norm; OPRD capture supports "
            "Llama/Qwen/Mistral-style CausalLMs"
        )
    return layers, norm


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_parts(model)[0])


def capture_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    response_mask: Tensor,
    layers: Sequence[int],
    positions: PositionMode,
    k: int = 1,
    with_logits: bool = False,
    shift: int = 0,
) -> SelectedStates:
    """Run ``model`` once and return the selected hidden states at the response slots.

    Args:
        input_ids, attention_mask, position_ids: ``[B, P+R]``.
        response_mask: ``[B, R]``; R is taken from its width.
        layers: HF indices (1..L) to keep; index L is the post-final-norm state.
        positions, k: position selection (see :func:`select_positions`).
        with_logits: also return next-token logits for the R response tokens (``[B, R, V]``, computed from
            the R positions before each response token only); used by the OPD and combined objectives so that
            both terms come from one forward.
        shift: 0 = the response slots themselves (OPRD semantics); 1 = the slots *predicting* each response
            token (positions ``[-R-1:-1]``), used to compute output distributions from final states.

    Grad flows through the returned states when called with grad enabled; call under ``torch.no_grad()``
    for the teacher. No ``[B, P+R, V]`` logits are ever built.
    """
    blocks, norm = decoder_parts(model)
    n_layers = len(blocks)
    r = response_mask.shape[-1]
    wanted = layer_indices(n_layers, list(layers))
    keep = r + 1 if with_logits else torch.empty(0, dtype=torch.long, device=input_ids.device)
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )

    def response_slots(h: Tensor) -> Tensor:
        end = h.shape[1] - shift
        return h[:, end - r : end, :]

    captured: dict[int, Tensor] = {}
    if torch.is_grad_enabled():
        # With grad, the states must be *outputs* of the root module: FSDP2 registers its pre-backward
        # (all-gather) hook on the root's outputs, and a tensor taken from a forward hook bypasses it. The tuple
        # only references activations autograd saves anyway.
        out = model(**kwargs, output_hidden_states=True, logits_to_keep=keep)
        captured = {i: response_slots(out.hidden_states[i]) for i in wanted}
    else:
        # No grad (teacher, old-log-prob pass): forward hooks keep only the requested layers, sliced to the
        # response slots as they are produced, instead of all L+1 full-sequence states.
        def make_hook(index: int):
            def hook(_mod: nn.Module, _inp: tuple, o: Tensor | tuple) -> None:
                captured[index] = response_slots(o[0] if isinstance(o, tuple) else o)

            return hook

        handles = [
            (norm if idx == n_layers else blocks[idx - 1]).register_forward_hook(make_hook(idx))
            for idx in wanted
        ]
        try:
            out = model(**kwargs, logits_to_keep=keep)
        finally:
            for h in handles:
                h.remove()
    stacked = torch.stack([captured[i] for i in layers], dim=1)  # [B, Λ, R, D]
    states, mask = select_positions(stacked, response_mask, positions, k)
    logits = out.logits[:, :-1, :] if with_logits else None  # positions P-1 .. P+R-2 predict the R tokens
    return SelectedStates(states=states, mask=mask, layers=list(layers), logits=logits)
