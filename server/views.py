"""ORM rows -> response schemas (the joins each response needs)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.mlflow_guard import Deadline
from server.orm import Alias, AuditEvent, Decision, ModelVersion, Policy, RegisteredModel, Trigger
from server.policy import policy_digest
from server.registry import checked_policy
from server.schemas import AliasOut, AuditOut, Criterion, DecisionOut, MlflowReadOut, VersionOut


def version_out(model: RegisteredModel, mv: ModelVersion) -> VersionOut:
    return VersionOut(
        model=model.name,
        version=mv.version,
        artifact_path=mv.artifact_path,
        manifest_sha256=mv.manifest_sha256,
        mlflow_source=mv.mlflow_source,
        run_id=mv.run_id,
        logged_model_id=mv.logged_model_id,
        teacher=mv.teacher,
        status=mv.status,
        retired_reason=mv.retired_reason,
        created_by=mv.created_by,
        created_at=mv.created_at,
    )


def decision_out(s: Session, model: RegisteredModel, d: Decision) -> DecisionOut:
    mv = s.get(ModelVersion, d.model_version_id)
    policy = s.get(Policy, d.policy_id)
    assert mv is not None and policy is not None
    return DecisionOut(
        id=d.id,
        model=model.name,
        version=mv.version,
        verdict=d.verdict,
        policy_version=policy.version,
        policy_digest=policy_digest(checked_policy(model, policy)),
        champion_version=d.champion_version,
        criteria=[Criterion.model_validate(c) for c in d.criteria],
        created_at=d.created_at,
        trigger_id=s.scalar(select(Trigger.id).where(Trigger.decision_id == d.id).limit(1)),
    )


def alias_out(model: RegisteredModel, a: Alias) -> AliasOut:
    return AliasOut(
        model=model.name, alias=a.alias, version=a.version, revision=a.revision, updated_at=a.updated_at
    )


def audit_out(e: AuditEvent) -> AuditOut:
    return AuditOut.model_validate(e)


def mlflow_read_out(deadline: Deadline | None) -> MlflowReadOut:
    """How the request's MLflow reads went (``None``: MLflow was not read)."""
    if deadline is None:
        return MlflowReadOut(state="off", budget_s=0.0, answered=0, missing=0)
    return MlflowReadOut(
        state=deadline.state, budget_s=deadline.budget_s, answered=deadline.answered, missing=deadline.missing
    )
