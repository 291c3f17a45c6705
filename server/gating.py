"""Policies, evidence and decisions: store evidence, run the decision engine, promote or auto-roll back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import Move, current_policy, get_alias, move_alias, rollback_target
from server.artifacts import ArtifactError, verify_artifact
from server.auth import Principal
from server.cost_history import recent_promoted
from server.db import Database
from server.decision import ChampionEvidence, decide
from server.drift import needed_k
from server.errors import Conflict, RegistryError
from server.events import add_audited
from server.orm import Alias, AuditEvent, Decision, Evidence, ModelVersion, Policy, RegisteredModel
from server.policy import PolicySpec
from server.registry import checked_policy, ensure_ready, get_model, next_audit_seq, verify_registered
from server.schemas import Criterion, EvidenceBody, Verdict
from server.settings import ServerSettings

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
    add_audited(  # the audit row and its event (server.events)
        s,
        model,
        AuditEvent(
            model_id=model.id,
            seq=next_audit_seq(model),
            action="policy_set",
            actor=who.name,
            role=who.role,
            reason=reason,
            policy_version=policy.version,
        ),
    )
    return policy


def prepare_decision(
    db: Database,
    name: str,
    manifest_sha256: str | None,
    version: int | None,
    body: EvidenceBody,
    *,
    alias: str,
    verified_path: Path | None = None,
    verify_version: bool,
    auto_rollback: bool,
) -> Planned | None:
    """Everything slow, before the write transaction: find the version (by number or manifest), re-hash its
    registered files when they are not the ones just verified at ``verified_path`` (a clean copy elsewhere
    must not vouch for tampered stored bytes: 409), decide, and verify the bytes of an auto-rollback target.
    None when the model does not exist yet (the transaction decides; it has no policy, so it refuses)."""
    with db.read() as s:
        model = s.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if model is None:
            return None
        q = select(ModelVersion).where(ModelVersion.model_id == model.id)
        mv = s.scalar(
            q.where(ModelVersion.version == version)
            if version is not None
            else q.where(ModelVersion.manifest_sha256 == manifest_sha256)
        )
        plan = plan_decision(s, model, mv.version if mv else None, body, alias)
        target_mv = None
        if plan.is_champion and plan.verdict == "REJECT" and auto_rollback:
            try:
                target = rollback_target(s, model, alias, None)
                target_mv = s.scalar(q.where(ModelVersion.version == target))
            except Conflict:
                pass
    if (
        verify_version
        and mv is not None
        and (verified_path is None or Path(mv.artifact_path) != verified_path)
    ):
        verify_registered(mv)
    if target_mv is None:
        return plan
    try:
        verify_artifact(Path(target_mv.artifact_path), target_mv.files)
    except ArtifactError as exc:
        log.warning(
            "auto-rollback target v%s of %s fails its integrity check: %s", target_mv.version, name, exc
        )
        return plan
    return replace(plan, rollback_target=target_mv.version)


def verify_signing(
    db: Database,
    settings: ServerSettings,
    name: str,
    path: Path,
    manifest_sha256: str,
    evidence: EvidenceBody | None,
    *,
    error: type[RegistryError],
) -> int | None:
    """Apply the model's current ``signing`` rule to the artifact at ``path`` with ``evidence`` (outside any
    transaction: it hashes every file). Raises ``error`` (422 at gate, 409 at promote) naming the mismatch. A
    model without a policy is not checked here: the gate refuses it for that.

    Returns the id of the policy whose rule was applied (None: no policy yet); the caller's write transaction
    passes it to :func:`ensure_policy_unchanged`, so a policy that starts requiring signatures while this check
    runs cannot let an unchecked artifact through."""
    with db.read() as s:
        model = s.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        policy = current_policy(s, model) if model is not None else None
    if policy is None:
        return None
    rule = checked_policy(model, policy).signing
    if not rule.required:
        return policy.id
    # Imported here: the crypto stack (~50 ms) stays out of every CLI start-up that never checks a signature.
    from server.signatures import SigningRefused, check_signed, load_keyring

    try:
        check_signed(path, manifest_sha256, rule, load_keyring(settings.trusted_keys_dir), evidence)
    except SigningRefused as exc:
        raise error(str(exc)) from exc
    return policy.id


def ensure_policy_unchanged(s: Session, model: RegisteredModel, checked_policy_id: int | None) -> None:
    """Under the model lock: the policy is still the one :func:`verify_signing` applied, else a 409 to retry
    (the new policy's signing rule has not been checked against this artifact)."""
    policy = current_policy(s, model)
    current = policy.id if policy is not None else None
    if current != checked_policy_id:
        raise Conflict(
            f"policy: {model.name}'s policy changed while this request verified the artifact against it; "
            "submit again (it is checked against the new policy)"
        )


def latest_evidence(s: Session, mv_id: int) -> EvidenceBody | None:
    ev = s.scalar(
        select(Evidence).where(Evidence.model_version_id == mv_id).order_by(Evidence.id.desc()).limit(1)
    )
    return EvidenceBody.model_validate(ev.payload) if ev is not None else None


@dataclass(frozen=True)
class Planned:
    """A decision computed from a snapshot, plus what it depended on (re-checked under the model lock)."""

    policy_id: int
    champion_version: int | None
    """The alias's version in the snapshot (None: no alias yet)."""
    champion_evidence_id: int | None
    is_champion: bool
    verdict: Verdict
    criteria: list[Criterion]
    rollback_target: int | None = None
    """For a REJECT of the champion with auto-rollback on: the version to go back to, bytes already verified."""


def champion_evidence(
    s: Session, model: RegisteredModel, row: Alias | None
) -> tuple[ChampionEvidence | None, int | None]:
    """The champion's version (``row``: its alias row, as read by the caller) with its latest stored evidence
    (empty suites if it has none: fail closed), and that evidence's id."""
    if row is None:
        return None, None
    mv = s.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == row.version)
    )
    assert mv is not None
    ev_row = s.scalar(
        select(Evidence).where(Evidence.model_version_id == mv.id).order_by(Evidence.id.desc()).limit(1)
    )
    if ev_row is None:
        return ChampionEvidence(version=row.version, suites={}, cost=None), None
    ev = EvidenceBody.model_validate(ev_row.payload)
    return (
        ChampionEvidence(
            version=row.version, suites={k: v.candidate for k, v in ev.suites.items()}, cost=ev.cost
        ),
        ev_row.id,
    )


def plan_decision(
    s: Session, model: RegisteredModel, version: int | None, body: EvidenceBody, alias: str
) -> Planned:
    """Decide about ``version`` (None: a version not registered yet) from the state visible in ``s``.

    Pure reads plus the CPU-heavy bootstrap: the gate runs this before its write transaction so the decision
    never holds the write lock; the transaction re-checks the inputs with ``still_valid``.
    """
    policy = current_policy(s, model)
    if policy is None:
        raise Conflict(f"policy: {model.name} has no policy; an admin must set one (oprd-ci policy set)")
    spec = checked_policy(model, policy)
    champ_row = get_alias(s, model, alias)
    is_champion = champ_row is not None and version is not None and champ_row.version == version
    champ, champ_ev_id = (None, None) if is_champion else champion_evidence(s, model, champ_row)
    recent = recent_promoted(s, model, spec, alias, exclude=version) if needed_k(spec) else ()
    verdict, criteria = decide(spec, body, champ, recent)
    return Planned(
        policy_id=policy.id,
        champion_version=champ_row.version if champ_row else None,
        champion_evidence_id=champ_ev_id,
        is_champion=is_champion,
        verdict=verdict,
        criteria=criteria,
    )


def still_valid(s: Session, model: RegisteredModel, version: int, alias: str, plan: Planned) -> bool:
    """Under the model lock: were the plan's inputs (policy, champion, champion evidence) left unchanged?"""
    policy = current_policy(s, model)
    row = get_alias(s, model, alias)
    current_champ = row.version if row else None
    if policy is None or policy.id != plan.policy_id or current_champ != plan.champion_version:
        return False
    if plan.is_champion != (current_champ == version):
        return False
    if plan.is_champion or row is None:
        return True
    newest = s.scalar(
        select(Evidence.id)
        .join(ModelVersion, Evidence.model_version_id == ModelVersion.id)
        .where(ModelVersion.model_id == model.id, ModelVersion.version == row.version)
        .order_by(Evidence.id.desc())
        .limit(1)
    )
    return newest == plan.champion_evidence_id


def submit_evidence(
    s: Session,
    who: Principal,
    model: RegisteredModel,
    mv: ModelVersion,
    body: EvidenceBody,
    *,
    alias: str,
    auto_rollback: bool,
    plan: Planned | None = None,
) -> Decision:
    """Record evidence about ``mv`` and its decision. Caller holds the model lock.

    ``plan`` (computed before the transaction) is used when ``still_valid``; otherwise the decision is made
    here (a concurrent policy change or champion move: rare, and then correct rather than fast).
    Evidence about the current champion is judged without a champion to compare to; if it fails and both
    the policy and the deployment enable auto-rollback, the alias is rolled back in the same transaction, to
    the target whose bytes the plan verified (no verified target: no automatic move, a warning instead).
    """
    if plan is None or not still_valid(s, model, mv.version, alias, plan):
        plan = plan_decision(s, model, mv.version, body, alias)
    policy = s.get(Policy, plan.policy_id)
    assert policy is not None
    spec = checked_policy(model, policy)
    ev = Evidence(model_version_id=mv.id, payload=body.model_dump(mode="json"), submitted_by=who.name)
    s.add(ev)
    s.flush()
    decision = Decision(
        model_version_id=mv.id,
        evidence_id=ev.id,
        policy_id=policy.id,
        verdict=plan.verdict,
        criteria=[c.model_dump(mode="json") for c in plan.criteria],
        champion_version=None if plan.is_champion else plan.champion_version,
    )
    s.add(decision)
    s.flush()
    if plan.is_champion and plan.verdict == "REJECT" and spec.auto_rollback and auto_rollback:
        champ_row = get_alias(s, model, alias)
        assert champ_row is not None
        try:
            target = rollback_target(s, model, alias, None)
        except Conflict as exc:
            log.warning("auto-rollback of %s@%s impossible: %s", model.name, alias, exc.detail)
            return decision
        if target != plan.rollback_target:
            log.warning(
                "auto-rollback of %s@%s skipped: target v%s was not integrity-checked",
                model.name,
                alias,
                target,
            )
            return decision
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
