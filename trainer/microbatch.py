"""Micro-batched actor update: split a rollout batch by a token budget, accumulate gradients, one optimizer step.

``distill.micro_batch_tokens`` bounds the *padded* token count of one forward: a micro-batch of ``b`` rows trimmed
to its own longest prompt ``p`` and longest response ``r`` costs ``b * (p + r)`` tokens. Rows are packed shortest
first by real length (prompt + response, ties by row index; next-fit in that order, so similar lengths share a
micro-batch and little padding is wasted); a single row longer than the budget is a micro-batch of its own. ``None``
keeps the whole batch as one micro-batch (untrimmed, exactly the tensors the engine returned).

Shortest first is what lets a remote teacher start before the rollout ends (:class:`MicroBatchStream`): rows finish
roughly in that order, and a micro-batch is final once no unfinished row can sort before its last row.

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
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

from trainer.objectives import Denominators, Objective, PendingTargets
from trainer.rollout import RolloutBatch, build_rollout_batch, expand_prompts
from trainer.teacher import TeacherBackend

__all__ = [
    "MicroBatchStream",
    "UpdateResult",
    "accumulate_update",
    "micro_batches",
    "pack_rows",
    "padded_tokens",
    "split_to",
    "teacher_request_stream",
]

T = TypeVar("T")


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


def pack_rows(prompt_real: list[int], resp_real: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices of each micro-batch (see the module docstring): shortest ``prompt + response`` first, next-fit
    under ``max_tokens`` padded tokens; each group sorted. :class:`MicroBatchStream` packs incrementally with
    :class:`_NextFit`, which this function runs over the whole batch at once."""
    order = sorted(range(len(resp_real)), key=lambda i: (prompt_real[i] + resp_real[i], i))
    packer = _NextFit(max_tokens)
    groups = [g for i in order for g in packer.add(i, prompt_real[i], resp_real[i])]
    return [*groups, *packer.flush()]


class _NextFit:
    """Next-fit packing of rows given in sort order: :meth:`add` returns the group it closed, if any."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1 or None, got {max_tokens}")
        self.max_tokens = max_tokens
        self.cur: list[int] = []
        self.p = self.r = 0

    def add(self, row: int, p_len: int, r_len: int) -> list[list[int]]:
        p, r = max(p_len, self.p), max(r_len, self.r)
        closed = []
        if self.cur and (len(self.cur) + 1) * (p + r) > self.max_tokens:
            closed = self.flush()
            p, r = p_len, r_len
        self.cur.append(row)
        self.p, self.r = p, r
        return closed

    def flush(self) -> list[list[int]]:
        out = [sorted(self.cur)] if self.cur else []
        self.cur, self.p, self.r = [], 0, 0
        return out


def _real_lengths(batch: RolloutBatch) -> tuple[list[int], list[int]]:
    """Per row: real prompt tokens and real response tokens (EOS included)."""
    return (
        batch.attention_mask[:, : batch.prompt_len].sum(dim=-1).tolist(),
        batch.response_mask.sum(dim=-1).tolist(),
    )


def micro_batches(batch: RolloutBatch, max_tokens: int | None) -> list[RolloutBatch]:
    """Split ``batch`` into micro-batches of at most ``max_tokens`` padded tokens (see the module docstring).

    ``None`` returns ``[batch]`` unchanged. Every row appears in exactly one micro-batch.
    """
    if max_tokens is None:
        return [batch]
    return [_rows(batch, g) for g in pack_rows(*_real_lengths(batch), max_tokens)]


def split_to(micro: list[RolloutBatch], count: int) -> tuple[list[RolloutBatch], list[int | None]]:
    """Split micro-batches until there are ``count`` of them: the one with the most rows is halved (each half
    trimmed to its own lengths, as :func:`micro_batches` trims) until the count is reached. Returns the new list and,
    per entry, the index in ``micro`` it is unchanged from (``None`` for a half).

    Why: under FSDP2 every forward and backward is a collective, so all ranks must run the same number of
    micro-batches; a rank whose rollout packed into fewer splits until it matches the largest count (every rank has
    the same number of rows, so this is always possible). The loss does not depend on the split (module docstring).
    """
    out: list[RolloutBatch] = list(micro)
    origin: list[int | None] = list(range(len(micro)))
    while len(out) < count:
        i = max(range(len(out)), key=lambda j: (out[j].input_ids.shape[0], -j))
        rows = out[i].input_ids.shape[0]
        if rows < 2:
            raise ValueError(f"cannot split {len(micro)} micro-batches into {count}: too few rows")
        half = rows // 2
        out[i : i + 1] = [_rows(out[i], list(range(half))), _rows(out[i], list(range(half, rows)))]
        origin[i : i + 1] = [None, None]
    return out, origin


class MicroBatchStream(Generic[T]):
    """The micro-batches of a rollout that is still running, each handed to ``submit`` as soon as it is final.

    Feed it the engine's progress (:meth:`progress`: rows that just finished with their response tokens, and how
    many tokens every unfinished row has so far), then the whole batch (:meth:`finish`). A finished row with key
    ``k = prompt + response`` is *settled* once every unfinished row ``j`` has ``prompt_j + generated_j >= k``: such
    a row still needs at least one token, so its final key exceeds ``k``. Settled rows come out in exactly the order
    :func:`pack_rows` sorts the finished batch, so the same next-fit packing closes the same groups, and each closed
    group goes to ``submit`` at once (e.g. a teacher request) while the engine keeps sampling the longer rows.

    :meth:`finish` packs the finished batch with :func:`micro_batches` and returns those micro-batches with the
    ``submit`` results of the streamed groups. A streamed group is built from the rows' own tokens exactly as
    :func:`micro_batches` cuts it from the batch (same trimming and layout); should the groups ever differ (an
    engine that reports lengths the batch layout does not reproduce), the streamed results are dropped and every
    micro-batch is submitted again from the batch, so a mismatch costs time, never correctness.

    ``prompts``/``n``/``pad_token_id``/``eos_token_id``: as given to the engine. ``device``: where the streamed
    micro-batches are moved before ``submit`` (the batch's device in :meth:`finish`). ``cancel``: called on a
    ``submit`` result that is dropped (after a mismatch, or when :meth:`resplit` halves its micro-batch).
    """

    def __init__(
        self,
        prompts: list[list[int]],
        n: int,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        max_tokens: int | None,
        submit: Callable[[RolloutBatch], T],
        cancel: Callable[[T], None] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.prompt_ids, self.prompt_mask, self.prompt_index = expand_prompts(prompts, n, pad_token_id)
        self.prompt_real: list[int] = self.prompt_mask.sum(dim=-1).tolist()
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        self.submit, self.cancel, self.device = submit, cancel, device
        self.packer = _NextFit(max_tokens) if max_tokens is not None else None
        self.tokens: dict[int, list[int]] = {}  # finished rows, settled or not
        self.waiting: dict[int, int] = {}  # finished, not yet settled: row -> key
        self.groups: list[list[int]] = []
        self.results: list[T] = []
        self.submitted_early = 0
        """Groups submitted while rows were still being sampled (the overlap the stream buys)."""
        self.submit_seconds = 0.0

    def progress(self, finished: dict[int, list[int]], open_lengths: dict[int, int]) -> None:
        """``finished``: rows that finished since the last call -> their response token ids; ``open_lengths``:
        every unfinished row -> tokens sampled so far (0 before its first)."""
        for row, toks in finished.items():
            self.tokens[row] = list(toks)
            if self.packer is not None:
                self.waiting[row] = self.prompt_real[row] + self._resp_real(self.tokens[row])
        if self.packer is None or not self.waiting:
            return
        bound = min((self.prompt_real[j] + m for j, m in open_lengths.items()), default=None)
        ready = sorted(((k, row) for row, k in self.waiting.items() if bound is None or k <= bound))
        for k, row in ready:
            del self.waiting[row]
            for group in self.packer.add(row, self.prompt_real[row], k - self.prompt_real[row]):
                self._submit(group, early=bool(open_lengths))

    def finish(self, batch: RolloutBatch) -> tuple[list[RolloutBatch], list[T]]:
        """The micro-batches of ``batch`` (:func:`micro_batches`) and one ``submit`` result per micro-batch, in
        order: the streamed ones, then the rest submitted now."""
        if self.packer is None:
            return [batch], [self._timed(batch)]
        groups = pack_rows(*_real_lengths(batch), self.packer.max_tokens)
        micro = [_rows(batch, g) for g in groups]  # = micro_batches(batch, max_tokens)
        leftover = sorted((k, row) for row, k in self.waiting.items())
        self.waiting.clear()
        for k, row in leftover:
            for group in self.packer.add(row, self.prompt_real[row], k - self.prompt_real[row]):
                self._submit(group, early=False)
        for group in self.packer.flush():
            self._submit(group, early=False)
        if self.groups != groups:
            self._drop(self.results)
            self.results, self.submitted_early = [self._timed(mb) for mb in micro], 0
        return micro, self.results

    def resplit(
        self, micro: list[RolloutBatch], results: list[T], count: int
    ) -> tuple[list[RolloutBatch], list[T], int]:
        """:func:`split_to` for :meth:`finish`'s output: a halved micro-batch's result is cancelled and each half
        submitted now. Returns the micro-batches, their results and how many halves were made."""
        split, origin = split_to(micro, count)
        if len(split) == len(micro):
            return micro, results, 0
        self._drop([r for i, r in enumerate(results) if i not in origin])
        results = [
            results[o] if o is not None else self._timed(mb) for o, mb in zip(origin, split, strict=True)
        ]
        return split, results, origin.count(None)

    # ------------------------------------------------------------------------------------------ pieces
    def _resp_real(self, toks: list[int]) -> int:
        """Real response tokens of one row as :func:`build_rollout_batch` counts them (up to the first EOS)."""
        ids = torch.full((1, max(1, len(toks))), self.pad_token_id, dtype=torch.long)
        ids[0, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
        one = build_rollout_batch(
            self.prompt_ids[:1], self.prompt_mask[:1], ids, self.prompt_index[:1],
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )  # fmt: skip
        return int(one.response_mask.sum())

    def _drop(self, results: list[T]) -> None:
        if self.cancel is not None:
            for r in results:
                self.cancel(r)

    def _submit(self, group: list[int], *, early: bool) -> None:
        rows = torch.as_tensor(group, dtype=torch.long)
        width = max(1, max(len(self.tokens[g]) for g in group))
        response = torch.full((len(group), width), self.pad_token_id, dtype=torch.long)
        for i, g in enumerate(group):
            response[i, : len(self.tokens[g])] = torch.as_tensor(self.tokens[g], dtype=torch.long)
        part = build_rollout_batch(
            self.prompt_ids[rows], self.prompt_mask[rows], response, self.prompt_index[rows],
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
        )  # fmt: skip
        self.groups.append(group)
        self.results.append(self._timed(_rows(part, list(range(len(group)))).to(self.device)))
        self.submitted_early += int(early)

    def _timed(self, mb: RolloutBatch) -> T:
        t0 = time.perf_counter()
        try:
            return self.submit(mb)
        finally:
            self.submit_seconds += time.perf_counter() - t0


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


def teacher_request_stream(
    objective: Objective,
    student: nn.Module,
    teacher: TeacherBackend,
    prompts: list[list[int]],
    n: int,
    *,
    pad_token_id: int,
    eos_token_id: int | list[int],
    max_tokens: int | None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    device: torch.device | str = "cpu",
) -> MicroBatchStream[PendingTargets]:
    """A :class:`MicroBatchStream` whose ``submit`` is :meth:`Objective.submit` to ``teacher`` (under ``autocast``):
    what :func:`submit_teacher_requests` does after the rollout, done as the rollout finishes each micro-batch."""

    def submit(mb: RolloutBatch) -> PendingTargets:
        with autocast():
            return objective.submit(student, teacher, mb)

    return MicroBatchStream(
        prompts, n, pad_token_id=pad_token_id, eos_token_id=eos_token_id, max_tokens=max_tokens, submit=submit,
        cancel=PendingTargets.cancel, device=device,
    )  # fmt: skip


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
