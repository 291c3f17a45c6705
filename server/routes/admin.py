"""Health, policies, retirement, tokens and manual reconciliation."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import current_policy
from server.auth import CurrentPrincipal, ensure_token, new_token
from server.deps import DbDep, ModelName, ReconcilerDep, VersionPath
from server.errors import NotFound
from server.gating import set_policy as _set_policy
from server.idempotency import run_mutation
from server.orm import ModelVersion, Policy, RegisteredModel
from server.policy import PolicySpec, policy_digest
from server.registry import get_model, get_version, lock_or_create_model, retire
from server.schemas import (
    HealthOut,
    PolicyOut,
    PolicySetIn,
    ReconcileOut,
    RetireIn,
    RetireTeacherIn,
    TokenCreateIn,
    TokenOut,
    VersionOut,
)
from server.views import version_out

router = APIRouter(tags=["admin"])


class RetireOut(BaseModel):
    retired: list[VersionOut]
    aliases_on_retired: list[str]
    """``model@alias->vN`` still pointing at a retired version: roll them back."""


def _policy_out(model: RegisteredModel, p: Policy) -> PolicyOut:
    spec = PolicySpec.model_validate(p.spec)
    return PolicyOut(
        model=model.name,
        version=p.version,
        spec=spec,
        digest=policy_digest(spec),
        reason=p.reason,
        created_by=p.created_by,
        created_at=p.created_at,
    )


@router.get("/health", name="health", response_model=HealthOut)
async def health(request: Request) -> HealthOut:
    """Liveness plus the outbox counts as of the reconciler's last pass. Async and free of I/O: it answers on the
    event loop even when every worker thread is busy, and never touches MLflow."""
    state = request.app.state
    stats = state.reconciler.stats
    return HealthOut(
        status="ok",
        database=state.db.engine.dialect.name,
        pending_mlflow_writes=stats.pending,
        parked_mlflow_writes=stats.parked,
        last_mlflow_error=state.mlflow_guard.last_error or stats.last_error,
        counts_age_s=round(max(0.0, time.time() - stats.at), 3),
    )


@router.get("/v1/models/{name}/policy", name="get_policy", response_model=PolicyOut)
def get_policy(name: ModelName, db: DbDep, _: CurrentPrincipal) -> PolicyOut:
    """The current policy of a model."""
    with db.read() as s:
        model = get_model(s, name)
        p = current_policy(s, model)
        if p is None:
            raise NotFound(f"policy: {name} has no policy")
        return _policy_out(model, p)


@router.put("/v1/models/{name}/policy", name="set_policy", response_model=PolicyOut)
def set_policy(name: ModelName, body: PolicySetIn, request: Request, who: CurrentPrincipal) -> JSONResponse:
    """Store a new policy version (creates the model if needed); later decisions use it."""

    def work(s: Session) -> PolicyOut:
        lock_or_create_model(s, name)
        p = _set_policy(s, who, name, body.spec, body.reason)
        return _policy_out(get_model(s, name), p)

    return run_mutation(request, who, name, work)


@router.post("/v1/models/{name}/versions/{version}/retire", name="retire_version", response_model=RetireOut)
def retire_version(
    name: ModelName, version: VersionPath, body: RetireIn, request: Request, who: CurrentPrincipal
) -> JSONResponse:
    """Mark one version as no longer eligible for any alias."""

    def work(s: Session) -> RetireOut:
        model = get_model(s, name, lock=True)
        mv = get_version(s, model, version)
        left = retire(s, who, model, [mv], body.reason)
        return RetireOut(retired=[version_out(model, mv)], aliases_on_retired=[f"{name}@{a}" for a in left])

    return run_mutation(request, who, name, work)


@router.post("/v1/teachers/retire", name="retire_teacher", response_model=RetireOut)
def retire_teacher(body: RetireTeacherIn, request: Request, who: CurrentPrincipal) -> JSONResponse:
    """Retire every version (of every model) distilled from ``teacher``."""

    def work(s: Session) -> RetireOut:
        out = RetireOut(retired=[], aliases_on_retired=[])
        model_ids = sorted(
            set(s.scalars(select(ModelVersion.model_id).where(ModelVersion.teacher == body.teacher)))
        )
        if not model_ids:
            raise NotFound(f"teacher: no version records teacher {body.teacher!r}")
        for mid in model_ids:  # lock in id order: two teacher retirements cannot deadlock
            model = s.scalar(select(RegisteredModel).where(RegisteredModel.id == mid).with_for_update())
            assert model is not None
            mvs = list(
                s.scalars(
                    select(ModelVersion).where(
                        ModelVersion.model_id == mid, ModelVersion.teacher == body.teacher
                    )
                )
            )
            left = retire(s, who, model, mvs, body.reason)
            out.retired += [version_out(model, mv) for mv in mvs]
            out.aliases_on_retired += [f"{model.name}@{a}" for a in left]
        return out

    return run_mutation(request, who, None, work)


@router.post("/v1/reconcile", name="reconcile", response_model=ReconcileOut)
def reconcile(reconciler: ReconcilerDep, _: CurrentPrincipal) -> ReconcileOut:
    """Apply pending MLflow writes now and repair alias drift (idempotent)."""
    r = reconciler.run_once(check_drift=True)
    return ReconcileOut(
        applied=r.applied, pending=r.pending, parked=r.parked, errors=r.errors, drift_fixed=r.drift_fixed
    )


@router.post("/v1/tokens", name="create_token", response_model=TokenOut, status_code=201)
def create_token(body: TokenCreateIn, request: Request, db: DbDep, _: CurrentPrincipal) -> TokenOut:
    """Create (or rotate) a named token; the secret is returned once and stored hashed."""
    secret = new_token()
    db.transact(lambda s: ensure_token(s, name=body.name, role=body.role, secret=secret))
    request.app.state.token_cache.clear()  # a rotated token stops working here at once
    return TokenOut(name=body.name, role=body.role, token=secret)
