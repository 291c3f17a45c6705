"""Distillation objectives as pure functions over tensors (oprd-method.md §2, §4).

Conventions shared by every function here:

* ``mask`` marks valid positions (bool or 0/1); masked positions contribute nothing, in value or gradient.
* ``denominator``: the *global* number of selected tokens (summed over micro-batches and data-parallel ranks).
  ``None`` means "this batch's own count" (a plain masked token-mean). Passing the global count makes the
  gradient of a sharded step equal to the gradient of the whole batch. An all-masked batch gives an exact 0.
* Log-probabilities and squared errors are computed in fp32, whatever the input dtype.
* Teacher tensors are treated as constants (``detach``); student tensors carry the gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "combined_loss",
    "full_vocab_reverse_kl",
    "full_vocab_reverse_kl_chunked",
    "opd_sampled_token_loss",
    "opd_topk_loss",
    "representation_cosine",
    "representation_loss",
    "token_logprobs",
]

Aggregation = Literal["token-mean", "seq-mean-token-mean"]


def _denom(count: Tensor, denominator: Tensor | float | None) -> Tensor:
    d = (
        count
        if denominator is None
        else torch.as_tensor(denominator, dtype=torch.float32, device=count.device)
    )
    return d.clamp(min=1.0)


# --------------------------------------------------------------------------------------- representation
def representation_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    *,
    normalize: bool = False,
    aggregation: Aggregation = "token-mean",
    coef: float = 1.0,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """OPRD loss, paper Eq. 6 with the reference code's aggregation (oprd-method.md §2.2).

    Args:
        student: ``[B, Λ, W, D]`` (or ``[B, W, D]`` for one layer) student states, with grad.
        teacher: same shape, the teacher's states on the same token ids (detached here).
        mask: ``[B, W]`` selected valid slots.
        normalize: False = raw ``||h_S - h_T||^2 / D`` (paper, reference ``main``); True = both vectors
            L2-normalized first, i.e. ``(2 - 2 cos) / D`` (reference ``OPRD-Bridge``).
        aggregation: ``token-mean`` = Σ_{b,t} m·e / Σ m per layer (reference default); ``seq-mean-token-mean``
            = mean over samples of each sample's token-mean (paper Eq. 6); samples with no token are skipped.
        coef: multiplier (μ in the combined objective).
        denominator: global count of selected tokens (token-mean) or of non-empty samples (seq-mean).
    Returns:
        scalar fp32: ``coef * mean over layers of the per-layer aggregate``.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} states differ in shape"
        )
    s = student.float()
    t = teacher.detach().float()
    if s.dim() == 3:
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    if normalize:
        s = F.normalize(s, p=2, dim=-1, eps=1e-12)
        t = F.normalize(t, p=2, dim=-1, eps=1e-12)
    err = (s - t).pow(2).mean(dim=-1)  # [B, Λ, W]: ||·||^2 / D
    m = mask.to(err.dtype).unsqueeze(1)  # [B, 1, W]
    if aggregation == "token-mean":
        per_layer = (err * m).sum(dim=(0, 2)) / _denom(m.sum(), denominator)  # [Λ]
    elif aggregation == "seq-mean-token-mean":
        tokens = m.sum(dim=-1)  # [B, 1]
        per_seq = (err * m).sum(dim=-1) / tokens.clamp(min=1.0)  # [B, Λ]
        nonempty = (tokens > 0).to(err.dtype)
        per_layer = (per_seq * nonempty).sum(dim=0) / _denom(nonempty.sum(), denominator)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; use token-mean or seq-mean-token-mean")
    return coef * per_layer.mean()


@torch.no_grad()
def representation_cosine(
    student: Tensor, teacher: Tensor, mask: Tensor, *, denominator: Tensor | float | None = None
) -> Tensor:
    """Per-layer masked-mean cosine between student and teacher states: ``[Λ]`` fp32 (``rep/cosine_similarity``
    is its mean). Inputs as in :func:`representation_loss`; an all-masked batch gives zeros. ``denominator``: the
    global count of selected slots, so that micro-batches' and ranks' values add up to the token-weighted mean."""
    s, t = student.float(), teacher.float()
    if s.dim() == 3:
        s, t = s.unsqueeze(1), t.unsqueeze(1)
    cos = F.cosine_similarity(s, t, dim=-1, eps=1e-12)  # [B, Λ, W]
    m = mask.to(cos.dtype).unsqueeze(1)
    return (cos * m).sum(dim=(0, 2)) / _denom(m.sum(), denominator)


# ------------------------------------------------------------------------------------------- output space
def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)`` gathered at ``ids``: ``[..., V]`` x ``[..., K]`` -> ``[..., K]`` fp32.

    ``ids`` may have a trailing K axis (top-k) or match ``logits.shape[:-1]`` (one id per position).
    """
    lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    if ids.dim() == logits.dim() - 1:
        return lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return lsm.gather(-1, ids)


def opd_sampled_token_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Sampled-token OPD ("OPD top-1", §4.1): REINFORCE with the per-token reward as the advantage.

    ``A_t = -(log p_old(ŷ_t) - log q(ŷ_t)) · m_t``, loss = token-mean(``-A_t · log π_θ(ŷ_t)``); on-policy with
    ratio ≡ 1, so the gradient is token-mean((log p - log q)·∇ log π_θ). Inputs ``[B, R]``; ``logprobs`` carries
    the grad; ``old_logprobs`` defaults to ``logprobs.detach()`` (identical on-policy). TV7: p=0.5, q=0.25 gives
    -0.4804530.
    """
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    m = mask.to(torch.float32)
    advantage = -(old.float() - teacher_logprobs.detach().float()) * m
    return (-advantage * logprobs.float()).sum() / _denom(m.sum(), denominator)


def opd_topk_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Tensor | None = None,
    weight: Literal["student_p", "teacher_p", "none"] = "student_p",
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Top-k OPD (§4.2, ``only_stu`` strategy) at the student's top-k ids.

    Args:
        logprobs: ``[B, R, k]`` full-vocabulary student log-probs at the fixed top-k ids, with grad.
        teacher_logprobs: ``[B, R, k]`` teacher log-probs at the same ids.
        mask: ``[B, R]``.
        old_logprobs: the no-grad pass's values (default ``logprobs.detach()``).
        weight: ``student_p`` = softmax over the k of the student log-probs; ``teacher_p`` = of the teacher's;
            ``none`` = 1/k.
    ``r_{t,j} = -(S_{t,j} - T_{t,j})·w_{t,j}``; per-token loss Σ_j -r_{t,j}·log π_θ(v_{t,j}); token-mean.
    Like the reference, log-ratios are full-vocabulary-normalized (not paper Eq. 5's renormalized KL).
    """
    old = (logprobs if old_logprobs is None else old_logprobs).detach().float()
    tch = teacher_logprobs.detach().float()
    if weight == "student_p":
        w = torch.softmax(old, dim=-1)
    elif weight == "teacher_p":
        w = torch.softmax(tch, dim=-1)
    elif weight == "none":
        w = torch.full_like(old, 1.0 / old.shape[-1])
    else:
        raise ValueError(f"unknown top-k weight {weight!r}; use student_p, teacher_p or none")
    m = mask.to(torch.float32)
    advantage = -(old - tch) * w * m.unsqueeze(-1)
    return (-advantage * logprobs.float()).sum() / _denom(m.sum(), denominator)


def full_vocab_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    teacher_temperature: float = 1.0,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Exact reverse KL ``Σ_v p_θ (log p_θ - log q)`` per position, token-mean (Eq. 4). ``[..., V]`` logits,
    ``[...]`` mask. Materializes fp32 ``[N, V]`` tensors: use the chunked form for long sequences."""
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().float() / teacher_temperature, dim=-1)
    kl = (ls.exp() * (ls - lt)).sum(dim=-1)
    m = mask.to(torch.float32)
    return (kl * m).sum() / _denom(m.sum(), denominator)


def _kl_chunk(hs: Tensor, w_s: Tensor, ht: Tensor, w_t: Tensor, m: Tensor, temperature: float) -> Tensor:
    ls = torch.log_softmax((hs @ w_s.t()).float(), dim=-1)
    lt = torch.log_softmax((ht @ w_t.t()).float() / temperature, dim=-1)
    return ((ls.exp() * (ls - lt)).sum(dim=-1) * m).sum()


def full_vocab_reverse_kl_chunked(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    mask: Tensor,
    *,
    chunk_size: int = 256,
    teacher_temperature: float = 1.0,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Reverse KL as :func:`full_vocab_reverse_kl`, computed from final hidden states in token chunks.

    Args:
        student_hidden: ``[N, D_S]`` final (post-norm) student states predicting each token, with grad.
        student_head: ``[V, D_S]`` student LM-head weight (with grad if trained).
        teacher_hidden: ``[N, D_T]`` final teacher states; teacher_head ``[V, D_T]`` (both constants).
        mask: ``[N]``.
    Each chunk's logits are recomputed in backward (activation checkpointing), so at most one ``[chunk, V]``
    fp32 block is alive instead of several ``[N, V]`` tensors; the teacher never stores ``[N, V]`` either.
    """
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError("full_vocab_reverse_kl_chunked takes flattened [N, D] hidden states")
    m = mask.to(torch.float32).reshape(-1)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    th, tw = teacher_hidden.detach(), teacher_head.detach()
    for start in range(0, student_hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(
            _kl_chunk,
            student_hidden[sl],
            student_head,
            th[sl],
            tw,
            m[sl],
            teacher_temperature,
            use_reentrant=False,
        )
    return total / _denom(m.sum(), denominator)


def combined_loss(opd: Tensor, rep: Tensor, mu: float) -> Tensor:
    """Paper Eq. 7: ``L = L_OPD + μ · L_OPRD`` (both terms from one student forward)."""
    return opd + mu * rep
