"""Micro-batched actor update: split a rollout batch by a token budget, accumulate gradients, one optimizer step.

``distill.micro_batch_tokens`` bounds the *padded* token count of one forward: a micro-batch of ``b`` rows trimmed
to its own longest prompt ``p`` and longest response ``r`` costs ``b * (p + r)`` tokens. Rows are packed longest
first (first-fit in that order, so similar lengths share a micro-batch and little padding is wasted); a single row
longer than the budget is a micro-batch of its own. ``None`` keeps the whole batch as one micro-batch (untrimmed,
exactly the tensors the engine returned).

Why the result does not depend on the split: every loss term and every logged metric is a sum over tokens (or
sequences) divided by the **global** count of the whole step (:class:`trainer.objectives.Denominators`, counted
from the full batch and all-reduced over ranks before the first micro-batch), so per-micro-batch losses add up to
the loss of the whole batch and their gradients to its gradient. Trimming padding changes no valid position:
``position_ids`` come from the attention mask and padded columns are masked out of attention and of every loss.

Per micro-batch, inside the loop: the no-grad passes (:meth:`Objective.prepare`: teacher states at the selected
layers/positions only, old log-probs / top-k for the OPD methods), then the student forward with grad and
``backward``. The teacher targets of the whole batch are never alive at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trainer.objectives import Denominators, Objective, PendingTargets
from trainer.rollout import RolloutBatch
from trainer.teacher import TeacherBackend

__all__ = ["UpdateResult", "accumulate_update", "micro_batches", "padded_tokens"]


def padded_tokens(batch: RolloutBatch) -> int:
    """Tokens one forward over ``batch`` processes: ``B * (P + R)``."""
    return int(batch.input_ids.shape[0] * batch.input_ids.shape[1])


def _rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """Rows ``rows`` of ``batch``, trimmed to their own longest prompt and longest response (same layout)."""
    idx = torch.as_tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    p_len = batch.prompt_len
    prompt_real = batch.attention_mask[idx, :p_len].sum(dim=-1)
    resp_real = batch.response_mask[idx].sum(dim=-1)
    p = max(int(prompt_real.max()), 1)  # prompts are left-padded: keep the last p columns of the prompt block
    r = max(int(resp_real.max()), 1)  # responses are right-padded: keep the first r columns
    cols = slice(p_len - p, p_len + r)
    return RolloutBatch(
        input_ids=batch.input_ids[idx, cols],
        attention_mask=batch.attention_mask[idx, cols],
        position_ids=batch.position_ids[idx, cols],
        response_mask=batch.response_mask[idx, :r],
        prompt_len=p,
        prompt_index=batch.prompt_index[idx],
    )


def micro_batches(batch: RolloutBatch, max_tokens: int | None) -> list[RolloutBatch]:
    """Split ``batch`` into micro-batches of at most ``max_tokens`` padded tokens (see the module docstring).

    ``None`` returns ``[batch]`` unchanged. Every row appears in exactly one micro-batch.
    """
    if max_tokens is None:
        return [batch]
    if max_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1 or None, got {max_tokens}")
    prompt_real = batch.attention_mask[:, : batch.prompt_len].sum(dim=-1).tolist()
    resp_real = batch.response_mask.sum(dim=-1).tolist()
    order = sorted(range(len(resp_real)), key=lambda i: (-(prompt_real[i] + resp_real[i]), i))
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_p = cur_r = 0
    for i in order:
        p, r = max(prompt_real[i], cur_p), max(resp_real[i], cur_r)
        if cur and (len(cur) + 1) * (p + r) > max_tokens:
            groups.append(cur)
            cur, p, r = [], prompt_real[i], resp_real[i]
        cur.append(i)
        cur_p, cur_r = p, r
    if cur:
        groups.append(cur)
    return [_rows(batch, sorted(g)) for g in groups]


@dataclass
class UpdateResult:
    """What one accumulated update produced (before the optimizer step).

    ``loss``: detached fp32 scalar, this rank's share of the global loss (ranks' values sum to the global loss).
    ``metrics``: this rank's additive contributions (``loss/*``, ``rep/cosine/layer_*``): they sum over ranks.
    ``prepare_seconds``: time spent in the no-grad passes (teacher, old log-probs) across micro-batches.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 1
    prepare_seconds: float = 0.0


def submit_teacher_requests(
    objective: Objective,
    student: nn.Module,
    teacher: TeacherBackend,
    micro: list[RolloutBatch],
    *,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[list[PendingTargets], float]:
    """Send every micro-batch's teacher request now (after the student's old-log-prob pass where the method has
    one, as the top-k ids are part of the request); returns the pending replies, in ``micro`` order, and the
    seconds spent sending. The trainer calls this as soon as this rank's rollout is done, before the step's
    collectives, so the teacher works while the rank waits for the others."""
    t0 = time.perf_counter()
    with autocast():
        pending = [objective.submit(student, teacher, mb) for mb in micro]
    return pending, time.perf_counter() - t0


def accumulate_update(
    objective: Objective,
    student: nn.Module,
    teacher: nn.Module | TeacherBackend,
    micro: list[RolloutBatch],
    den: Denominators,
    *,
    loss_scale: float = 1.0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    pending: list[PendingTargets] | None = None,
) -> UpdateResult:
    """No-grad passes, student forward and ``backward`` per micro-batch; gradients accumulate in ``.grad``.

    ``den`` must be the global denominators of the whole step (all micro-batches, all ranks). ``loss_scale``
    multiplies each micro-batch loss before ``backward`` (the world size under FSDP2, whose reduce-scatter
    averages over ranks). Under FSDP2 the gradient reduce-scatter runs once, after the last micro-batch's backward
    (``set_requires_gradient_sync(False)`` before the others): unsharded gradients accumulate locally in between,
    one reduce-scatter per step instead of one per micro-batch. The caller zeroes gradients and steps.

    ``teacher``: an ``nn.Module`` (in-process: each micro-batch's :meth:`Objective.prepare` runs right before its
    update) or a :class:`trainer.teacher.TeacherBackend` (all requests submitted up front, replies consumed in
    order; ``prepare_seconds`` then counts the submission and the waits, i.e. the teacher time *not* overlapped).
    A teacher failure raises out of here before the caller's optimizer step: no update sees partial targets.
    ``pending``: the replies :func:`submit_teacher_requests` already requested for ``micro`` (then nothing is
    sent here).
    """
    set_sync = getattr(student, "set_requires_gradient_sync", None)
    total = torch.zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    prep = 0.0
    if pending is None and isinstance(teacher, TeacherBackend):
        # Remote teacher: every request goes out now; replies are consumed in order below while the student updates.
        pending, prep = submit_teacher_requests(objective, student, teacher, micro, autocast=autocast)
    pending = list(pending or [])
    try:
        for i, mb in enumerate(micro):
            if set_sync is not None:
                set_sync(i == len(micro) - 1)
            t0 = time.perf_counter()
            if pending:
                targets = pending[i].result()
                pending[i] = None  # type: ignore[call-overload]  # drop the reply once consumed
            else:
                with autocast():
                    targets = objective.prepare(student, teacher, mb)
            prep += time.perf_counter() - t0
            with autocast():
                loss, m = objective.loss(student, mb, targets, den)
            del targets
            (loss * loss_scale).backward()
            total += loss.detach().float().cpu()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + v
            del loss
    finally:
        if set_sync is not None:
            set_sync(True)
    return UpdateResult(loss=total, metrics=metrics, micro_batches=len(micro), prepare_seconds=prep)
