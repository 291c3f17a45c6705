"""Policies, evidence and decisions: store evidence, run the decision engine, promote or auto-roll back."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import Move, current_policy, get_alias, move_alias, rollback_target
from server.auth import Principal
from server.decision import ChampionEvidence, decide
from server.errors import Conflict
from server.orm import AuditEvent, Decision, Evidence, ModelVersion, Policy, RegisteredModel
from server.policy import PolicySpec
from server.registry import ensure_ready, get_model, next_audit_seq
from server.schemas import EvidenceBody

log = logging.getLogger(__name__)
SYSTEM = Principal(name="system:auto-rollback", role="admin")


def set_policy(s: Session, who: Principal, name: str, spec: PolicySpec, reason: str) -> Policy:
    """Store ``spec`` as the next policy version of ``name`` (audited). Existing decisions keep their version."""
    model = get_model(s, name, lock=True)
    prev = current_policy(s, model)
    policy = Policy(
        model_id=model.id,
        version=(prev.version + 1) if prev else 1,
        spec=spec.model_dump(mode="json"),
        reason=reason,
        created_by=who.name,
    )
    s.add(policy)
    s.flush()
    s.add(
        AuditEvent(
            model_id=model.id,
            seq=next_audit_seq(model),
            action="policy_set",
            actor=who.name,
            role=who.role,
            reason=reason,
            policy_version=policy.version,
        )
    )
    return policy


def latest_evidence(s: Session, mv_id: int) -> EvidenceBody | None:
    ev = s.scalar(
        select(Evidence).where(Evidence.model_version_id == mv_id).order_by(Evidence.id.desc()).limit(1)
    )
    return EvidenceBody.model_validate(ev.payload) if ev is not None else None


def champion_evidence(s: Session, model: RegisteredModel, alias: str) -> ChampionEvidence | None:
    """The champion's version with its latest stored evidence (empty suites if it has none: fail closed)."""
    row = get_alias(s, model, alias)
    if row is None:
        return None
    mv = s.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == row.version)
    )
    assert mv is not None
    ev = latest_evidence(s, mv.id)
    if ev is None:
        return ChampionEvidence(version=row.version, suites={}, cost=None)
    return ChampionEvidence(
        version=row.version, suites={k: v.candidate for k, v in ev.suites.items()}, cost=ev.cost
    )


def submit_evidence(
    s: Session,
    who: Principal,
    model: RegisteredModel,
    mv: ModelVersion,
    body: EvidenceBody,
    *,
    alias: str,
    auto_rollback: bool,
) -> Decision:
    """Record evidence about ``mv`` and decide. Caller holds the model lock.

    Evidence about the current champion is judged without a champion to compare to; if it fails and both
    the policy and the deployment enable auto-rollback, the alias is rolled back in the same transaction.
    """
    policy = current_policy(s, model)
    if policy is None:
        raise Conflict(f"policy: {model.name} has no policy; an admin must set one (oprd-ci policy set)")
    spec = PolicySpec.model_validate(policy.spec)
    ev = Evidence(model_version_id=mv.id, payload=body.model_dump(mode="json"), submitted_by=who.name)
    s.add(ev)
    s.flush()
    champ_row = get_alias(s, model, alias)
    is_champion = champ_row is not None and champ_row.version == mv.version
    champ = None if is_champion else champion_evidence(s, model, alias)
    verdict, criteria = decide(spec, body, champ)
    decision = Decision(
        model_version_id=mv.id,
        evidence_id=ev.id,
        policy_id=policy.id,
        verdict=verdict,
        criteria=[c.model_dump(mode="json") for c in criteria],
        champion_version=champ.version if champ else None,
    )
    s.add(decision)
    s.flush()
    if is_champion and verdict == "REJECT" and spec.auto_rollback and auto_rollback:
        assert champ_row is not None
        try:
            target = rollback_target(s, model, alias, None)
        except Conflict as exc:
            log.warning("auto-rollback of %s@%s impossible: %s", model.name, alias, exc.detail)
        else:
            move_alias(
                s,
                SYSTEM,
                model,
                alias,
                Move(
                    action="auto_rollback",
                    to_version=target,
                    expected_revision=champ_row.revision,
                    reason=f"decision {decision.id}: new evidence against v{mv.version} violates policy v{policy.version}",
                    decision_id=decision.id,
                    policy_version=policy.version,
                ),
            )
    return decision


def promote_on_verdict(
    s: Session,
    who: Principal,
    model: RegisteredModel,
    mv: ModelVersion,
    decision: Decision,
    alias: str,
    *,
    reason: str | None = None,
) -> bool:
    """Move ``alias`` to ``mv`` if the decision says PROMOTE and it is not already there (gate path); the audit
    reason is the decision, plus the caller's ``reason`` when given."""
    if decision.verdict != "PROMOTE":
        return False
    ensure_ready(mv)
    row = get_alias(s, model, alias, lock=True)
    if row is not None and row.version == mv.version:
        return False
    policy = s.get(Policy, decision.policy_id)
    move_alias(
        s,
        who,
        model,
        alias,
        Move(
            action="promote",
            to_version=mv.version,
            expected_revision=row.revision if row else 0,
            reason=f"gate decision {decision.id}: PROMOTE" + (f" ({reason})" if reason else ""),
            decision_id=decision.id,
            policy_version=policy.version if policy else None,
        ),
    )
    return True
