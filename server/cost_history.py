"""Cost over time: per version, accuracy, response length, distillation cost and what the gate flagged.

Read from the registry's own records (no MLflow): each version's latest evidence (``evidence.payload``, validated
as ``EvidenceBody`` when it was stored), its latest decision, and the alias's ``promote`` audit events. Served by
``GET /v1/models/{name}/cost-history`` (``oprd-ci history NAME --cost``) and, for the gate's
``max_ratio_to_recent_median`` criteria, by :func:`recent_promoted`.

Units: accuracy is the mean per-problem Avg@k fraction in [0, 1] per suite; tokens are the mean response length in
tokens; ``usd`` and ``device_hours`` are the distill stage's cost as the evidence states it; ``usd_per_point`` is
USD per percentage point of accuracy (the mean over the evidence's suites, x100).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import get_alias
from server.drift import PromotedValues, needed_k
from server.orm import AuditEvent, Decision, Evidence, ModelVersion, RegisteredModel
from server.policy import PolicySpec

COST_CRITERIA = ("length_tokens", "cost_usd", "device_hours")
"""Criterion-name prefixes that are about cost or length (``cost_usd_ratio``, ``length_tokens_recent_median``...)."""

HistoryStatus = Literal["champion", "promoted", "rejected", "inconclusive", "passed", "retired", "registered"]


class CostHistoryRow(BaseModel):
    """One version of the model, oldest first in the response."""

    version: int
    status: HistoryStatus
    """retired > champion (the alias points here now) > promoted (the alias pointed here before) > the latest
    decision's verdict (rejected / inconclusive / passed = PROMOTE without the alias moving) > registered (no
    decision)."""
    created_at: datetime
    verdict: str | None
    decision_id: int | None
    accuracy: dict[str, float]
    """Suite -> the candidate's mean Avg@k in [0, 1]."""
    tokens_per_response: float | None
    """Mean over the evidence's suites of the candidate's mean response length, in tokens."""
    device_hours: float | None
    usd: float | None
    usd_per_point: float | None
    """``usd / (100 x mean accuracy over suites)``; None when accuracy is 0 or the cost is missing."""
    flagged: list[str]
    """Cost/length criteria (``COST_CRITERIA``) of the latest decision that FAILed, e.g. ``cost_usd_recent_median``."""


def _latest_evidence(s: Session, mv_id: int) -> dict[str, Any] | None:
    return s.scalar(
        select(Evidence.payload)
        .where(Evidence.model_version_id == mv_id)
        .order_by(Evidence.id.desc())
        .limit(1)
    )


def _mean_length(payload: dict[str, Any], suites: list[str]) -> float | None:
    per_suite = []
    for suite in suites:
        rows = payload["suites"][suite]["candidate"]
        per_suite.append(sum(r["mean_length"] for r in rows) / len(rows))
    return sum(per_suite) / len(per_suite) if per_suite else None


def _promoted_order(s: Session, model: RegisteredModel, alias: str) -> list[int]:
    """Versions the alias was promoted to, most recent promotion first, each once."""
    rows = s.scalars(
        select(AuditEvent.to_version)
        .where(AuditEvent.model_id == model.id, AuditEvent.alias == alias, AuditEvent.action == "promote")
        .order_by(AuditEvent.seq.desc())
    ).all()
    return list(dict.fromkeys(v for v in rows if v is not None))


def recent_promoted(
    s: Session, model: RegisteredModel, policy: PolicySpec, alias: str, *, exclude: int | None
) -> list[PromotedValues]:
    """The last ``k`` distinct versions promoted to ``alias`` (most recent promotion first; retired versions and
    ``exclude``, the candidate, left out), ``k`` = the largest ``recent_k`` among the policy's drift criteria, with
    their values from their latest evidence. Lengths are averaged over the policy's suites, as the criteria do."""
    k = needed_k(policy)
    out: list[PromotedValues] = []
    for version in _promoted_order(s, model, alias):
        if len(out) >= k:
            break
        if version == exclude:
            continue
        mv = s.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
        )
        if mv is None or mv.status == "RETIRED":
            continue
        payload = _latest_evidence(s, mv.id) or {"suites": {}}
        cost = payload.get("cost") or {}
        suites = [x for x in policy.suites if x in payload["suites"]]
        out.append(
            PromotedValues(
                version=version,
                usd=cost.get("usd"),
                device_hours=cost.get("device_hours"),
                length_tokens=_mean_length(payload, suites),
            )
        )
    return out


def cost_history(s: Session, model: RegisteredModel, alias: str, *, limit: int) -> list[CostHistoryRow]:
    """The ``limit`` most recent versions of ``model``, oldest first (see :class:`CostHistoryRow`)."""
    versions = list(
        reversed(
            s.scalars(
                select(ModelVersion)
                .where(ModelVersion.model_id == model.id)
                .order_by(ModelVersion.version.desc())
                .limit(limit)
            ).all()
        )
    )
    promoted = set(_promoted_order(s, model, alias))
    champ = get_alias(s, model, alias)
    rows = []
    for mv in versions:
        payload = _latest_evidence(s, mv.id)
        decision = s.scalar(
            select(Decision).where(Decision.model_version_id == mv.id).order_by(Decision.id.desc()).limit(1)
        )
        acc: dict[str, float] = {}
        tokens = usd = hours = per_point = None
        if payload is not None:
            for suite, data in payload["suites"].items():
                cand = data["candidate"]
                acc[suite] = sum(r["n_correct"] / r["k"] for r in cand) / len(cand)
            tokens = _mean_length(payload, list(payload["suites"]))
            cost = payload.get("cost") or {}
            usd, hours = cost.get("usd"), cost.get("device_hours")
            points = 100.0 * sum(acc.values()) / len(acc) if acc else 0.0
            per_point = usd / points if usd is not None and points > 0 else None
        rows.append(
            CostHistoryRow(
                version=mv.version,
                status=_status(mv, decision, champ.version if champ else None, promoted),
                created_at=mv.created_at,
                verdict=decision.verdict if decision else None,
                decision_id=decision.id if decision else None,
                accuracy=acc,
                tokens_per_response=tokens,
                device_hours=hours,
                usd=usd,
                usd_per_point=per_point,
                flagged=[
                    c["criterion"]
                    for c in (decision.criteria if decision else [])
                    if c["status"] == "FAIL" and c["criterion"].startswith(COST_CRITERIA)
                ],
            )
        )
    return rows


def _status(
    mv: ModelVersion, decision: Decision | None, champion: int | None, promoted: set[int]
) -> HistoryStatus:
    if mv.status == "RETIRED":
        return "retired"
    if mv.version == champion:
        return "champion"
    if mv.version in promoted:
        return "promoted"
    if decision is None:
        return "registered"
    return {"REJECT": "rejected", "INCONCLUSIVE": "inconclusive"}.get(decision.verdict, "passed")  # type: ignore[return-value]
