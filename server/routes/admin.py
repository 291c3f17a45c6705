"""Health, policies, retirement, tokens and manual reconciliation."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
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
from server.orm import ModelVersion, OutboxItem, Policy, RegisteredModel
from server.policy import policy_digest
from server.reconciler import OutboxStats, drop_parked, list_outbox, read_outbox_stats, retry_parked
from server.registry import checked_policy, get_model, get_version, lock_or_create_model, retire
from server.schemas import (
    HealthOut,
    OutboxActionIn,
    OutboxRowOut,
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
from server.webhooks import DeliveryStats, delivery_stats

router = APIRouter(tags=["admin"])
_HEALTH_DB_S = (
    1.0  # /health reads the outbox from the database at most this long, else the last pass's counts
)
_RECONCILE_WAIT_S = 2.0  # POST /v1/reconcile waits this long for a running pass to end, then answers 202
OutboxId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Outbox row id (`oprd-ci outbox list`)")]


class RetireOut(BaseModel):
    retired: list[VersionOut]
    aliases_on_retired: list[str]
    """``model@alias->vN`` still pointing at a retired version: roll them back."""


def _policy_out(model: RegisteredModel, p: Policy) -> PolicyOut:
    spec = checked_policy(model, p)
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
    """Liveness plus the MLflow outbox as the database holds it now: ``degraded`` while writes are parked,
    failing, or pending past the grace. Async: the database read runs on asyncio's own executor bounded by
    ``_HEALTH_DB_S`` (not on the request thread pool, which may be full), and falls back to the counts of the
    reconciler's last pass. Never touches MLflow."""
    state = request.app.state
    reconciler = state.reconciler
    hooks: DeliveryStats | None = None
    try:
        stats, hooks = await asyncio.wait_for(asyncio.to_thread(_health_reads, state.db), _HEALTH_DB_S)
        age = 0.0
    except Exception:  # the database is slow or down: say what the last pass saw, and how old that is
        stats = reconciler.stats
        age = round(max(0.0, time.time() - stats.at), 3)
    started = reconciler.pass_started
    status = stats.state(reconciler.retry.pending_grace_s)
    if hooks is not None and hooks.dead:
        status = "degraded"
    return HealthOut(
        status=status,
        database=state.db.engine.dialect.name,
        pending_mlflow_writes=stats.pending,
        parked_mlflow_writes=stats.parked,
        failing_mlflow_writes=stats.failing,
        oldest_pending_age_s=stats.oldest_pending_age_s(),
        last_mlflow_error=state.mlflow_guard.last_error or reconciler.last_error or stats.last_error,
        reconcile_pass_running_s=None if started is None else round(max(0.0, time.time() - started), 3),
        counts_age_s=age,
        pending_webhook_deliveries=None if hooks is None else hooks.pending,
        dead_webhook_deliveries=None if hooks is None else hooks.dead,
        oldest_pending_delivery_age_s=None if hooks is None else hooks.oldest_pending_age_s(),
    )


def _health_reads(db) -> tuple[OutboxStats, DeliveryStats]:
    """The MLflow outbox and the webhook deliveries, as the database holds them now."""
    with db.read() as s:  # one read transaction: both counts of the same instant
        return read_outbox_stats(s), delivery_stats(s)


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


@router.post(
    "/v1/reconcile",
    name="reconcile",
    response_model=ReconcileOut,
    responses={202: {"model": ReconcileOut, "description": "a pass is running; nothing was started"}},
)
def reconcile(reconciler: ReconcilerDep, _: CurrentPrincipal) -> JSONResponse:
    """Apply pending MLflow writes now and repair alias drift (idempotent), within the pass deadline
    (``OPRD_RECONCILE_PASS_DEADLINE_S``). When a pass is already running and does not end within
    ``_RECONCILE_WAIT_S``, this answers 202 with the current counts instead of waiting for it."""
    r = reconciler.run_once(check_drift=True, wait=_RECONCILE_WAIT_S, now=True)
    out = ReconcileOut(
        applied=r.applied, pending=r.pending, parked=r.parked, errors=r.errors, drift_fixed=r.drift_fixed
    )
    if r.busy:
        out.errors.append("a reconcile pass is running; its writes are in progress (see /health)")
        return JSONResponse(out.model_dump(mode="json"), status_code=202)
    return JSONResponse(out.model_dump(mode="json"))


def _outbox_out(row: OutboxItem) -> OutboxRowOut:
    return OutboxRowOut(
        id=row.id,
        kind=row.kind,
        model=row.model_name,
        payload=row.payload,
        state="dropped"
        if row.applied_at is not None
        else "parked"
        if row.parked_at is not None
        else "pending",
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        parked_at=row.parked_at,
    )


@router.get("/v1/outbox", name="list_outbox", response_model=list[OutboxRowOut])
def outbox_list(
    db: DbDep,
    _: CurrentPrincipal,
    parked: bool = Query(default=False, description="Only parked rows."),
    limit: int = Query(default=1000, ge=1, le=100_000),
) -> list[OutboxRowOut]:
    """MLflow writes not applied yet: parked first, then pending (oldest first), with attempts and last error."""
    return [_outbox_out(r) for r in list_outbox(db, include_pending=not parked, limit=limit)]


@router.post("/v1/outbox/{row_id}/retry", name="retry_outbox", response_model=OutboxRowOut)
def outbox_retry(
    row_id: OutboxId, body: OutboxActionIn, db: DbDep, reconciler: ReconcilerDep, who: CurrentPrincipal
) -> OutboxRowOut:
    """Make a parked (or backing-off) row due now with a fresh retry budget; audited as ``mlflow_retry``."""
    row = retry_parked(db, row_id, who.name, who.role, body.reason)
    reconciler.kick()
    return _outbox_out(row)


@router.post("/v1/outbox/{row_id}/drop", name="drop_outbox", response_model=OutboxRowOut)
def outbox_drop(row_id: OutboxId, body: OutboxActionIn, db: DbDep, who: CurrentPrincipal) -> OutboxRowOut:
    """Give up on a row for good: MLflow never gets this write; audited as ``mlflow_dropped``."""
    return _outbox_out(drop_parked(db, row_id, who.name, who.role, body.reason))


@router.post("/v1/tokens", name="create_token", response_model=TokenOut, status_code=201)
def create_token(body: TokenCreateIn, request: Request, db: DbDep, _: CurrentPrincipal) -> TokenOut:
    """Create (or rotate) a named token; the secret is returned once and stored hashed."""
    secret = new_token()
    db.transact(lambda s: ensure_token(s, name=body.name, role=body.role, secret=secret))
    request.app.state.token_cache.clear()  # a rotated token stops working here at once
    return TokenOut(name=body.name, role=body.role, token=secret)
