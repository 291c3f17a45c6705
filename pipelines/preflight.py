"""On-policy pair collection and the representation-alignment pre-flight (the ``rollout`` stage's library).

The student base samples responses to training prompts; the teacher runs on the same token ids. Per HF layer we
measure the masked-mean cosine between student and teacher states and the norm ratio ``||h_S|| / ||h_T||``.

Why a cosine threshold: raw-MSE OPRD asks the student to reproduce the teacher's coordinates. With a shared
lineage (the student is an early checkpoint of the teacher's run, like the paper's pair) the bases are aligned
(cosine 0.8-0.9 per layer) and OPRD closes most of the gap. With an independently initialized student of the same
architecture the bases are unrelated (cosine ~0) and vanilla OPRD destroys the student (0% accuracy in the
pre-project probe, embedded-task-notes §5). ``rollout.min_cosine`` (default 0.3) sits between the two regimes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import Params
from trainer.hidden import capture_hidden_states
from trainer.methods import method_spec
from trainer.models import LayerPlan
from trainer.rollout import RolloutBatch, RolloutEngine

__all__ = ["AlignmentError", "AlignmentReport", "measure_alignment", "sample_rollouts"]


class AlignmentError(RuntimeError):
    """Vanilla OPRD was asked for on a pair whose hidden states are unrelated."""


@dataclass
class AlignmentReport:
    layers: list[int]
    cosine: list[float]  # per student HF layer
    norm_ratio: list[float]  # mean ||h_S|| / ||h_T|| per layer
    mse_per_dim: list[float]  # raw ||h_S - h_T||^2 / D per layer (the OPRD loss at step 0)

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosine) / len(self.cosine)

    def as_metrics(self) -> dict[str, float]:
        """Finite values only: across hidden sizes cosine and MSE are undefined (NaN) and are left out, so the
        metrics file stays strict JSON with numbers only (the norm ratio is still reported)."""
        out = {"alignment/cosine_mean": self.mean_cosine}
        for i, layer in enumerate(self.layers):
            out[f"alignment/cosine/layer_{layer}"] = self.cosine[i]
            out[f"alignment/norm_ratio/layer_{layer}"] = self.norm_ratio[i]
            out[f"alignment/mse_per_dim/layer_{layer}"] = self.mse_per_dim[i]
        return {k: v for k, v in out.items() if math.isfinite(v)}


def sample_rollouts(
    student: nn.Module, prompt_ids: list[list[int]], params: Params, engine: RolloutEngine
) -> RolloutBatch:
    r = params.rollout
    torch.manual_seed(params.seed)
    return engine.generate(
        student,
        prompt_ids,
        n=r.n_responses,
        temperature=r.temperature,
        top_p=r.top_p,
        max_new_tokens=r.max_new_tokens,
    )


@torch.no_grad()
def measure_alignment(
    student: nn.Module, teacher: nn.Module, batch: RolloutBatch, plan: LayerPlan
) -> AlignmentReport:
    """Per-layer cosine, norm ratio and MSE/D between student and teacher on every valid response token.

    With different hidden sizes (the OPRD-Bridge setting) states cannot be compared coordinate-wise: cosine and
    MSE are NaN and only the norm ratio is reported; the bridge stage measures the alignment through its bank.
    """
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
    s = capture_hidden_states(student, *args, plan.student, "all")
    t = capture_hidden_states(teacher, *args, plan.teacher, "all")
    m = s.mask.unsqueeze(1).float()  # [B, 1, R]
    hs, ht = s.states.float(), t.states.float()  # [B, Λ, R, D]
    n = m.sum().clamp(min=1.0)
    ratio = ((hs.norm(dim=-1) / ht.norm(dim=-1).clamp(min=1e-12)) * m).sum(dim=(0, 2)) / n
    if hs.shape[-1] != ht.shape[-1]:
        nan = [float("nan")] * len(plan.student)
        return AlignmentReport(plan.student, nan, ratio.tolist(), nan)
    cos = (torch.nn.functional.cosine_similarity(hs, ht, dim=-1, eps=1e-12) * m).sum(dim=(0, 2)) / n
    mse = ((hs - ht).pow(2).mean(dim=-1) * m).sum(dim=(0, 2)) / n
    return AlignmentReport(plan.student, cos.tolist(), ratio.tolist(), mse.tolist())


def check_alignment(report: AlignmentReport, params: Params) -> str | None:
    """``None`` if distillation may proceed; else raise :class:`AlignmentError` (or return a warning when the
    user set ``rollout.allow_unaligned``)."""
    method = params.distill.method
    threshold = params.rollout.min_cosine
    if (
        not method_spec(method).hidden_states
        or params.distill.rep.normalize
        or report.mean_cosine >= threshold
    ):
        return None
    per_layer = ", ".join(f"L{lay}={c:.2f}" for lay, c in zip(report.layers, report.cosine, strict=True))
    msg = (
        f"student and teacher hidden states are unrelated on the student's own rollouts: mean cosine "
        f"{report.mean_cosine:.3f} < rollout.min_cosine={threshold} ({per_layer}). Vanilla OPRD (raw MSE) would "
        "destroy the student. Use distill.method: oprd_bridge (a fitted low-rank bridge), opd_sampled or opd_topk, "
        "or distill.rep.normalize: true, or a "
        "student of the teacher's lineage; set rollout.allow_unaligned: true to run anyway."
    )
    if params.rollout.allow_unaligned:
        return "warning: " + msg
    raise AlignmentError(msg)
