"""The per-step objective of each distillation method: what the no-grad passes compute, and the student loss.

A step counts its global denominators once, ``den = objective.denominators(batch)`` all-reduced over ranks, then
per micro-batch (:mod:`trainer.microbatch`) runs ``targets = objective.prepare(student, teacher, mb)`` (no grad: the
teacher pass, plus the student's old-log-prob pass for output-space methods, as the reference does) followed by
``loss, metrics = objective.loss(student, mb, targets, den)`` (one student forward with grad). Every loss term and
every metric is normalized by ``den`` (global counts), so micro-batch losses, gradients and metrics *add up* to
those of the whole batch, whatever the split.

==============  ==========================================================  =========================================
method          no-grad passes                                              student forward (with grad)
==============  ==========================================================  =========================================
``oprd``        teacher: selected hidden states only (no logits)            selected hidden states only (no logits)
``opd_sampled`` student: log p_old(ŷ); teacher: log q(ŷ)                    logits at the R response positions
``opd_topk``    student: top-k ids + log p_old; teacher: log q at the ids   logits at the R response positions
``full_kl``     teacher: logits (plain) or final states (chunked)           logits (plain) or final states (chunked)
``combined``    student: log p_old(ŷ); teacher: states + log q(ŷ)           states + logits, one forward
==============  ==========================================================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer.config import DistillConfig
from trainer.hidden import capture_hidden_states, num_decoder_layers, position_mask
from trainer.losses import (
    combined_loss,
    full_vocab_reverse_kl,
    full_vocab_reverse_kl_chunked,
    opd_sampled_token_loss,
    opd_topk_loss,
    representation_cosine,
    representation_loss,
    token_logprobs,
)
from trainer.methods import method_spec
from trainer.models import LayerPlan
from trainer.rollout import RolloutBatch
from trainer.teacher import PendingReply, TeacherBackend, TeacherReply, TeacherRequest

__all__ = ["Denominators", "Objective", "PendingTargets", "Targets"]


@dataclass
class Targets:
    """What the no-grad passes produced for one rollout batch (shapes: B rows, R response slots)."""

    states: Tensor | None = None  # [B, Λ, W, D] teacher states, compute dtype
    state_mask: Tensor | None = None  # [B, W]
    token_logprobs: Tensor | None = None  # [B, R] teacher log q(ŷ_t)
    old_logprobs: Tensor | None = None  # [B, R] or [B, R, k] student no-grad log-probs
    topk_ids: Tensor | None = None  # [B, R, k]
    topk_logprobs: Tensor | None = None  # [B, R, k] teacher log q at the student's top-k ids
    logits: Tensor | None = None  # [B, R, V] teacher logits (plain full-vocab KL)
    final_states: Tensor | None = None  # [B, R, D_T] teacher final states predicting each token (chunked KL)
    head_weight: Tensor | None = None  # [V, D_T] teacher LM head (chunked KL)

    def to(self, device: torch.device) -> Targets:
        return Targets(
            **{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        )


@dataclass
class Denominators:
    """Global (all ranks, all micro-batches) counts the losses and metrics are normalized by (fp32 scalars)."""

    selected: Tensor  # selected representation slots (token-mean rep loss, cosine monitor)
    response: Tensor  # valid response tokens (output-space losses)
    sequences: Tensor | None = None  # rows with at least one selected slot (seq-mean-token-mean rep loss)


def _full(t: Tensor) -> Tensor:
    """A plain tensor from a possibly FSDP2-sharded parameter (teacher weights are constants)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compute_dtype(t: Tensor) -> Tensor:
    """Teacher states in the compute dtype: under bf16 autocast the residual stream comes out fp32 (fp32 weights),
    but it was computed from bf16 matmuls; keeping it in bf16 halves the targets' memory (the losses upcast)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.is_floating_point():
        return t.to(torch.get_autocast_dtype(dev))
    return t


def _autocast_name(device_type: str) -> str | None:
    """``"bfloat16"`` when bf16 autocast is on for ``device_type`` (the teacher pass then runs under it too)."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
        return "bfloat16"
    return None


class PendingTargets:
    """The :class:`Targets` of one micro-batch whose teacher reply is still in flight; ``result()`` waits."""

    def __init__(self, objective: Objective, out: Targets, pending: PendingReply, device: torch.device):
        self.objective, self.out, self.pending, self.device = objective, out, pending, device

    def result(self) -> Targets:
        return self.objective.finish(self.out, self.pending.result(), self.device)

    def cancel(self) -> None:
        """The reply is no longer wanted (its micro-batch was split): cancel it where the backend can."""
        cancel = getattr(self.pending, "cancel", None)
        if cancel is not None:
            cancel()


class Objective:
    """Binds a :class:`DistillConfig` and a :class:`LayerPlan` to the no-grad and grad passes of one step."""

    def __init__(
        self, cfg: DistillConfig, plan: LayerPlan, *, monitor_cosine: bool = False, chunked_kl: bool = True
    ):
        self.cfg = cfg
        self.plan = plan
        self.method = cfg.method
        self.spec = method_spec(cfg.method)
        self.uses_states = self.spec.hidden_states
        self.monitor_cosine = monitor_cosine
        # Capturing all selected states only to log cosines costs memory and time in output-space runs, so it is
        # opt-in there (``distill.monitor_cosine``); methods with a representation term have them anyway. The
        # full-KL path captures final states only and never monitors.
        self.capture_states = self.uses_states or (monitor_cosine and not self.spec.full_vocab)
        self.chunked_kl = chunked_kl

    # ----------------------------------------------------------------------------------------- no grad
    @torch.no_grad()
    def _student_pass(self, student: nn.Module, batch: RolloutBatch, out: Targets) -> None:
        """The reference's compute_log_prob pass (OPD methods; equal to the update's detached values on-policy):
        fills ``out.old_logprobs`` and, for top-k, ``out.topk_ids``."""
        if not self.spec.old_logprobs:
            return
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        resp_ids = batch.input_ids[:, -batch.response_mask.shape[1] :]
        s = capture_hidden_states(student, *args, [num_decoder_layers(student)], "last", with_logits=True)
        if self.spec.top_k:
            out.topk_ids = s.logits.topk(self.cfg.opd.top_k, dim=-1).indices
            out.old_logprobs = token_logprobs(s.logits, out.topk_ids)
        else:
            out.old_logprobs = token_logprobs(s.logits, resp_ids)

    @torch.no_grad()
    def prepare(self, student: nn.Module, teacher: nn.Module, batch: RolloutBatch) -> Targets:
        """Both no-grad passes of one micro-batch with an in-process teacher module (``teacher.placement: local``)."""
        rep, opd = self.cfg.rep, self.cfg.opd
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        resp_ids = batch.input_ids[:, -batch.response_mask.shape[1] :]
        out = Targets()
        self._student_pass(student, batch, out)
        if self.spec.full_vocab:
            if self.chunked_kl:
                t = capture_hidden_states(teacher, *args, [num_decoder_layers(teacher)], "all", shift=1)
                out.final_states = _compute_dtype(t.states[:, 0])
                out.head_weight = _full(teacher.get_output_embeddings().weight)
            else:
                t = capture_hidden_states(
                    teacher, *args, [num_decoder_layers(teacher)], "last", with_logits=True
                )
                out.logits = t.logits
            return out
        layers = self.plan.teacher if self.capture_states else [num_decoder_layers(teacher)]
        positions = rep.positions if self.capture_states else "last"
        want_logits = self.spec.teacher_logits
        t = capture_hidden_states(teacher, *args, layers, positions, rep.k, with_logits=want_logits)
        if self.capture_states:
            out.states, out.state_mask = _compute_dtype(t.states), t.mask
        if self.spec.sampled_token:
            out.token_logprobs = token_logprobs(t.logits, resp_ids, opd.teacher_temperature)
        elif self.spec.top_k:
            out.topk_logprobs = token_logprobs(t.logits, out.topk_ids, opd.teacher_temperature)
        return out

    def teacher_request(self, out: Targets, batch: RolloutBatch) -> TeacherRequest:
        """What a remote teacher must compute for ``batch`` (after :meth:`_student_pass` filled ``out``): the
        same layers/positions/log-prob ids :meth:`prepare` asks its module for, in the current compute dtype."""
        rep, opd = self.cfg.rep, self.cfg.opd
        if self.spec.full_vocab:
            raise ValueError(
                "full_kl needs the full [tokens, vocab] teacher distribution: use a local teacher"
            )
        ids = None
        if self.spec.sampled_token:
            ids = batch.input_ids[:, -batch.response_mask.shape[1] :]
        elif self.spec.top_k:
            ids = out.topk_ids
        return TeacherRequest(
            layers=tuple(self.plan.teacher) if self.capture_states else (),
            positions=rep.positions, k=rep.k, logprob_ids=ids, temperature=opd.teacher_temperature,
            compute_dtype=_autocast_name(batch.input_ids.device.type),
        )  # fmt: skip

    def finish(self, out: Targets, reply: TeacherReply, device: torch.device) -> Targets:
        """Fill ``out`` from a remote teacher's reply (moved to ``device``): the :class:`Targets` :meth:`prepare`
        returns for the same batch."""
        if reply.states is not None:
            out.states, out.state_mask = reply.states.to(device), reply.mask.to(device)
        if reply.logprobs is not None:
            if self.spec.sampled_token:
                out.token_logprobs = reply.logprobs.to(device)
            else:
                out.topk_logprobs = reply.logprobs.to(device)
        return out

    @torch.no_grad()
    def submit(self, student: nn.Module, teacher: TeacherBackend, batch: RolloutBatch) -> PendingTargets:
        """:meth:`prepare` with a :class:`trainer.teacher.TeacherBackend`: the student pass runs now, the teacher
        request is sent now, and ``result()`` waits for the reply. Requests of several micro-batches can be in
        flight at once (the trainer submits them all right after the rollout)."""
        out = Targets()
        self._student_pass(student, batch, out)
        req = self.teacher_request(out, batch)
        if getattr(teacher, "identity", None) is not None:
            req = TeacherRequest(**{**req.__dict__, "identity": teacher.identity})
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        return PendingTargets(self, out, teacher.submit(*args, req), batch.input_ids.device)

    def denominators(self, batch: RolloutBatch, targets: Targets | None = None) -> Denominators:
        """Local counts of ``batch`` (the whole step's batch on this rank, not a micro-batch); the trainer
        all-reduces them (SUM) across ranks before the first :meth:`loss`. Counted from the masks alone (no
        forward pass): the selected slots are those :func:`trainer.hidden.position_mask` marks, which is exactly
        the compacted state mask's count. ``targets`` is accepted for backward compatibility and ignored."""
        rep = self.cfg.rep
        if self.capture_states:
            per_row = position_mask(batch.response_mask, rep.positions, rep.k).sum(dim=-1)
        else:
            per_row = batch.response_mask.sum(dim=-1)
        return Denominators(
            selected=per_row.sum().float(),
            response=batch.response_mask.sum().float(),
            sequences=(per_row > 0).sum().float(),
        )

    # ------------------------------------------------------------------------------------------- grad
    def loss(
        self, student: nn.Module, batch: RolloutBatch, targets: Targets, den: Denominators
    ) -> tuple[Tensor, dict[str, float]]:
        """Student forward with grad and the method's loss; returns ``(loss, metrics)``.

        ``metrics`` holds Python floats of the local contribution: ``loss/<term>`` and, when states are captured,
        ``rep/cosine/layer_<i>`` per HF layer index.
        """
        rep, opd = self.cfg.rep, self.cfg.opd
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        resp_ids = batch.input_ids[:, -batch.response_mask.shape[1] :]
        mask = batch.response_mask
        metrics: dict[str, float] = {}
        if self.spec.full_vocab:
            return self._full_kl(student, args, targets, mask, den)
        want_logits = self.spec.teacher_logits  # the student's logits meet the teacher's output-space targets
        layers = self.plan.student if self.capture_states else [num_decoder_layers(student)]
        positions = rep.positions if self.capture_states else "last"
        s = capture_hidden_states(student, *args, layers, positions, rep.k, with_logits=want_logits)
        rep_loss = opd_loss = None
        if self.uses_states:
            rep_loss = representation_loss(
                s.states, targets.states, targets.state_mask,
                normalize=rep.normalize, aggregation=rep.aggregation,
                coef=1.0 if self.spec.teacher_logits else rep.coef,
                denominator=den.sequences if rep.aggregation == "seq-mean-token-mean" else den.selected,
            )  # fmt: skip
            metrics["loss/rep"] = rep_loss.item()
        if self.capture_states and targets.states is not None:
            # Token-weighted over the whole step: each micro-batch contributes its cosine *sum* / global count.
            cos = representation_cosine(s.states, targets.states, s.mask, denominator=den.selected)
            for idx, c in zip(self.plan.student, cos, strict=True):
                metrics[f"rep/cosine/layer_{idx}"] = c.item()
        if self.spec.sampled_token:
            lp = token_logprobs(s.logits, resp_ids)
            opd_loss = opd_sampled_token_loss(
                lp, targets.token_logprobs, mask, old_logprobs=targets.old_logprobs, denominator=den.response
            )
        elif self.spec.top_k:
            lp = token_logprobs(s.logits, targets.topk_ids)
            opd_loss = opd_topk_loss(
                lp, targets.topk_logprobs, mask, old_logprobs=targets.old_logprobs,
                weight=opd.weight, denominator=den.response,
            )  # fmt: skip
        if opd_loss is not None:
            metrics["loss/opd"] = opd_loss.item()
        if rep_loss is not None and opd_loss is not None:  # combined: μ = rep.coef enters here (Eq. 7)
            loss = combined_loss(opd_loss, rep_loss, rep.coef)
        else:
            loss = rep_loss if rep_loss is not None else opd_loss
        metrics["loss/total"] = loss.item()
        return loss, metrics

    def _full_kl(self, student, args, targets: Targets, mask: Tensor, den: Denominators):
        opd = self.cfg.opd
        n_s = num_decoder_layers(student)
        if self.chunked_kl:
            s = capture_hidden_states(student, *args, [n_s], "all", shift=1)
            flat = mask.reshape(-1).bool()
            hs = s.states[:, 0].reshape(-1, s.states.shape[-1])[flat]
            ht = targets.final_states.reshape(-1, targets.final_states.shape[-1])[flat]
            loss = full_vocab_reverse_kl_chunked(
                hs, student.get_output_embeddings().weight, ht, targets.head_weight,
                torch.ones(hs.shape[0], device=hs.device),
                chunk_size=opd.kl_chunk_size, teacher_temperature=opd.teacher_temperature, denominator=den.response,
            )  # fmt: skip
        else:
            s = capture_hidden_states(student, *args, [n_s], "last", with_logits=True)
            loss = full_vocab_reverse_kl(
                s.logits,
                targets.logits,
                mask,
                teacher_temperature=opd.teacher_temperature,
                denominator=den.response,
            )
        return loss, {"loss/kl": loss.item(), "loss/total": loss.item()}
