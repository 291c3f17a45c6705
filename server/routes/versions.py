"""Models, versions, evidence, decisions and the one-call gate."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import check_alias
from server.auth import CurrentPrincipal
from server.deps import AliasQuery, DbDep, ModelName, ReasonQuery, ReconcilerDep, SettingsDep, VersionPath
from server.errors import Invalid, NotFound
from server.gating import ensure_policy_unchanged, prepare_decision, promote_on_verdict, verify_signing
from server.gating import submit_evidence as _submit
from server.idempotency import run_mutation
from server.orm import Alias, Decision, ModelVersion, RegisteredModel
from server.registry import get_model, get_version, prepare_registration, record_version
from server.schemas import DecisionOut, EvidenceBody, EvidenceIn, GateOut, RegisterVersionIn, VersionOut
from server.sources import check_logged_model
from server.triggers import check_link, link_decision
from server.views import alias_out, decision_out, version_out

router = APIRouter(prefix="/v1", tags=["versions"])
TriggerQuery = Annotated[
    int | None, Query(ge=1, le=2**31 - 1, description="The trigger whose cycle this gate ends (linked)")
]


@router.get("/models", name="list_models", response_model=list[str])
def list_models(db: DbDep, _: CurrentPrincipal) -> list[str]:
    """Names of all registered models."""
    with db.read() as s:
        return list(s.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)))


@router.post("/models/{name}/versions", name="register_version", response_model=VersionOut, status_code=201)
def register_version(
    name: ModelName,
    body: RegisterVersionIn,
    request: Request,
    settings: SettingsDep,
    reconciler: ReconcilerDep,
    who: CurrentPrincipal,
) -> JSONResponse:
    """Register an artifact directory (hashes verified against its manifest) as the next version."""
    verified, source = prepare_registration(settings, body)
    check_logged_model(reconciler.mirror, source, settings.mlflow_validate_timeout_s)

    def work(s: Session) -> VersionOut:
        mv = record_version(s, who, name, body, verified, source)
        return version_out(get_model(s, name), mv)

    return run_mutation(request, who, name, work, status_code=201)


@router.get("/models/{name}/versions", name="list_versions", response_model=list[VersionOut])
def list_versions(name: ModelName, db: DbDep, _: CurrentPrincipal) -> list[VersionOut]:
    """Every version of a model, oldest first."""
    with db.read() as s:
        model = get_model(s, name)
        rows = s.scalars(
            select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)
        )
        return [version_out(model, mv) for mv in rows]


@router.get("/models/{name}/versions/{version}", name="get_version", response_model=VersionOut)
def get_version_route(name: ModelName, version: VersionPath, db: DbDep, _: CurrentPrincipal) -> VersionOut:
    """One version."""
    with db.read() as s:
        model = get_model(s, name)
        return version_out(model, get_version(s, model, version))


@router.post("/models/{name}/versions/{version}/evidence", name="submit_evidence", response_model=DecisionOut)
def submit_evidence(
    name: ModelName,
    version: VersionPath,
    body: EvidenceBody,
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    who: CurrentPrincipal,
    alias: AliasQuery = "champion",
) -> JSONResponse:
    """Submit evidence about a version and get the policy decision (may auto-roll back the champion)."""

    auto = settings.auto_rollback
    plan = prepare_decision(
        db, name, None, version, body, alias=alias, verify_version=False, auto_rollback=auto
    )

    def work(s: Session) -> DecisionOut:
        model = get_model(s, name, lock=True)
        mv = get_version(s, model, version)
        d = _submit(s, who, model, mv, body, alias=alias, auto_rollback=auto, plan=plan)
        return decision_out(s, model, d)

    return run_mutation(request, who, name, work)


@router.post("/gate", name="gate", response_model=GateOut)
def gate(
    body: EvidenceIn,
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    reconciler: ReconcilerDep,
    who: CurrentPrincipal,
    promote: bool = True,
    alias: AliasQuery = "champion",
    reason: ReasonQuery = None,
    trigger_id: TriggerQuery = None,
) -> JSONResponse:
    """Register the candidate (if new), record its evidence, decide, and on PROMOTE move the alias (the audit row
    records ``reason`` after the decision id). ``trigger_id``: the queued or running trigger whose cycle this
    gate ends; the decision is linked to it in the same transaction (``server.triggers``)."""
    check_alias(alias)
    reg = RegisterVersionIn(
        artifact_path=body.artifact_path,
        mlflow_run_id=body.mlflow_run_id,
        logged_model_id=body.logged_model_id,
        mlflow_source=body.mlflow_source,
        teacher=body.lineage.teacher,
    )
    verified, source = prepare_registration(settings, reg)
    check_logged_model(reconciler.mirror, source, settings.mlflow_validate_timeout_s)
    evidence = EvidenceBody(suites=body.suites, cost=body.cost, lineage=body.lineage)
    # The policy's signing rule: signature, attestation and its agreement with this evidence (422 naming it).
    signing_policy = verify_signing(
        db, settings, body.model, verified.path, verified.sha256, evidence, error=Invalid
    )
    auto = settings.auto_rollback
    # Outside the transaction: integrity of the stored bytes the alias may move to, and the decision itself.
    plan = prepare_decision(
        db,
        body.model,
        verified.sha256,
        None,
        evidence,
        alias=alias,
        verified_path=verified.path,
        verify_version=promote,
        auto_rollback=auto,
    )

    def work(s: Session) -> GateOut:
        mv = record_version(s, who, body.model, reg, verified, source)
        model = get_model(s, body.model, lock=True)
        ensure_policy_unchanged(s, model, signing_policy)
        if trigger_id is not None:
            check_link(s, model, trigger_id)  # before deciding: a bad trigger id records nothing
        d = _submit(s, who, model, mv, evidence, alias=alias, auto_rollback=auto, plan=plan)
        if trigger_id is not None:
            link_decision(s, model, trigger_id, d)
        moved = promote and promote_on_verdict(s, who, model, mv, d, alias, reason=reason)
        row = (
            s.scalar(select(Alias).where(Alias.model_id == model.id, Alias.alias == alias)) if moved else None
        )
        return GateOut(
            version=version_out(model, mv),
            decision=decision_out(s, model, d),
            promoted=alias_out(model, row) if row else None,
        )

    return run_mutation(request, who, body.model, work)


@router.get("/decisions/{decision_id}", name="get_decision", response_model=DecisionOut)
def get_decision(decision_id: VersionPath, db: DbDep, _: CurrentPrincipal) -> DecisionOut:
    """One decision with its criteria table."""
    with db.read() as s:
        d = s.get(Decision, decision_id)
        if d is None:
            raise NotFound(f"decision_id: no decision {decision_id}")
        mv = s.get(ModelVersion, d.model_version_id)
        assert mv is not None
        model = s.get(RegisteredModel, mv.model_id)
        assert model is not None
        return decision_out(s, model, d)
