"""The ``oprd_bridge`` objective (oprd-method.md §5.4): OPRD through a fitted low-rank bridge.

==============  ==========================================================  =========================================
method          no-grad passes                                              student forward (with grad)
==============  ==========================================================  =========================================
``oprd_bridge`` teacher: mapped hidden states -> r-dim codes z_T (no logits) selected hidden states -> z_S = P_S h_S
==============  ==========================================================  =========================================

The teacher targets kept between the two passes are the ``[B, Λ, W, r]`` codes, not ``[B, Λ, W, D_T]`` states.
The loss is :func:`trainer.losses.representation_loss` on the codes with ``normalize=True`` (always: the bridge's
Stage-2 loss is the L2-normalized MSE), ``distill.rep`` aggregation and ``coef``, and the global denominator, so
under FSDP2 the gradient equals the whole batch's. The bank is loaded from the same artifact on every rank (one
bank for all ranks, never refitted per rank); frozen by default, so it needs no synchronization.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.bridge import BridgeBank
from trainer.config import DistillConfig
from trainer.hidden import capture_hidden_states
from trainer.losses import representation_cosine, representation_loss
from trainer.models import LayerPlan
from trainer.objectives import Denominators, Objective, Targets
from trainer.rollout import RolloutBatch
from trainer.teacher import TeacherReply

__all__ = ["BridgeObjective"]


class BridgeObjective(Objective):
    """:class:`Objective` for ``distill.method: oprd_bridge``; ``bank`` must match ``plan``'s layer pairs."""

    def __init__(self, cfg: DistillConfig, plan: LayerPlan, bank: BridgeBank):
        if cfg.method != "oprd_bridge":
            raise ValueError(f"BridgeObjective is for distill.method oprd_bridge, got {cfg.method}")
        super().__init__(cfg, plan, monitor_cosine=True)
        bank.check_plan(plan.student, plan.teacher)
        self.bank = bank
        self.uses_states = True
        self.capture_states = True

    @torch.no_grad()
    def prepare(self, student: nn.Module, teacher: nn.Module, batch: RolloutBatch) -> Targets:
        rep = self.cfg.rep
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        t = capture_hidden_states(teacher, *args, self.plan.teacher, rep.positions, rep.k)
        return Targets(states=self.bank.teacher_codes(t.states), state_mask=t.mask)

    def finish(self, out: Targets, reply: TeacherReply, device: torch.device) -> Targets:
        """A remote teacher returns the mapped states; the codes are computed here, with the rank's bank."""
        return Targets(
            states=self.bank.teacher_codes(reply.states.to(device)), state_mask=reply.mask.to(device)
        )

    def loss(
        self, student: nn.Module, batch: RolloutBatch, targets: Targets, den: Denominators
    ) -> tuple[Tensor, dict[str, float]]:
        """``coef * mean_l token-mean (2 - 2 cos(z_S, z_T)) / r``; metrics ``loss/rep``, ``loss/total`` and the
        code-space cosine ``rep/cosine/layer_<i>`` per student HF layer (what the bridge's val cosine measured)."""
        rep = self.cfg.rep
        args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
        s = capture_hidden_states(student, *args, self.plan.student, rep.positions, rep.k)
        z_s = self.bank.student_codes(s.states)
        loss = representation_loss(
            z_s, targets.states, targets.state_mask, normalize=True, aggregation=rep.aggregation,
            coef=rep.coef,
            denominator=den.sequences if rep.aggregation == "seq-mean-token-mean" else den.selected,
        )  # fmt: skip
        metrics = {"loss/rep": loss.item(), "loss/total": loss.item()}
        # Token-weighted over the whole step: each micro-batch contributes its cosine sum / the global count.
        cos = representation_cosine(z_s, targets.states, s.mask, denominator=den.selected)
        for idx, c in zip(self.plan.student, cos, strict=True):
            metrics[f"rep/cosine/layer_{idx}"] = c.item()
        return loss, metrics
