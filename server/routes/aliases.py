"""Alias moves (promote, rollback) and the read views over them (status, history, lineage)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import aliases as ops
from server.auth import CurrentPrincipal
from server.db import Database
from server.deps import AliasName, DbDep, GuardDep, ModelName, ReconcilerDep
from server.errors import Conflict
from server.gating import latest_evidence
from server.idempotency import run_mutation
from server.mlflow_guard import MlflowGuard
from server.mlflow_mirror import MlflowMirror
from server.names import NAME_PATTERN
from server.orm import Alias, AuditEvent, Decision, RegisteredModel
from server.registry import ensure_ready, get_model, get_version, verify_registered
from server.schemas import AliasOut, AuditOut, LineageOut, PromoteIn, RollbackIn, StatusOut
from server.status import model_status as status_query
from server.views import alias_out, audit_out, decision_out, version_out

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models/{name}", tags=["aliases"])


def _verify_before_move(db: Database, name: str, version: int) -> None:
    # Hash check outside the write transaction (large artifacts must not hold the write lock).
    with db.read() as s:
        model = get_model(s, name)
        mv = get_version(s, model, version)
        ensure_ready(mv)
    verify_registered(mv)


@router.post("/aliases/{alias}/promote", name="promote", response_model=AliasOut)
def promote(
    name: ModelName, alias: AliasName, body: PromoteIn, request: Request, db: DbDep, who: CurrentPrincipal
) -> JSONResponse:
    """Point the alias at a version whose latest decision is PROMOTE under the current policy (CAS on revision)."""
    ops.check_alias(alias)
    _verify_before_move(db, name, body.version)

    def work(s: Session) -> AliasOut:
        row = ops.promote(
            s,
            who,
            name,
            alias,
            version=body.version,
            expected_revision=body.expected_revision,
            reason=body.reason,
            override=body.override,
        )
        return alias_out(s.get(RegisteredModel, row.model_id), row)  # identity map: no query

    return run_mutation(request, who, name, work)


@router.post("/aliases/{alias}/rollback", name="rollback", response_model=AliasOut)
def rollback(
    name: ModelName, alias: AliasName, body: RollbackIn, request: Request, db: DbDep, who: CurrentPrincipal
) -> JSONResponse:
    """Move the alias back to the previously promoted version, or to ``to_version`` from its history."""
    ops.check_alias(alias)
    with db.read() as s:
        target = ops.rollback_target(s, get_model(s, name), alias, body.to_version)
    _verify_before_move(db, name, target)

    def work(s: Session) -> AliasOut:
        row = ops.rollback(
            s,
            who,
            name,
            alias,
            expected_revision=body.expected_revision,
            reason=body.reason,
            to_version=body.to_version,
        )
        if row.version != target:  # history changed between the check and the move: let the client re-read
            raise Conflict(f"expected_revision: rollback target of {name}@{alias} changed concurrently")
        return alias_out(s.get(RegisteredModel, row.model_id), row)  # identity map: no query

    return run_mutation(request, who, name, work)


@router.get("/status", name="model_status", response_model=StatusOut)
def model_status(
    name: ModelName,
    db: DbDep,
    reconciler: ReconcilerDep,
    guard: GuardDep,
    _: CurrentPrincipal,
    mlflow: bool = Query(default=True, description="Also read the aliases from MLflow (slower)."),
) -> StatusOut:
    """Aliases (with revisions), the champion with its decision, and whether MLflow agrees."""
    return status_query(
        db,
        name,
        mirror=reconciler.mirror,
        guard=guard,
        reconciler_error=reconciler.last_error,
        mlflow=mlflow,
        pending_grace_s=reconciler.retry.pending_grace_s,
    )


@router.get("/history", name="model_history", response_model=list[AuditOut])
def model_history(
    name: ModelName, db: DbDep, _: CurrentPrincipal, limit: int = Query(default=1000, ge=1, le=100_000)
) -> list[AuditOut]:
    """The append-only audit log of the model, oldest first (gapless ``seq``)."""
    with db.read() as s:
        model = get_model(s, name)
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.model_id == model.id)
            .order_by(AuditEvent.seq.desc())
            .limit(limit)
        ).all()
        return [audit_out(e) for e in reversed(rows)]


@router.get("/lineage", name="model_lineage", response_model=LineageOut)
def model_lineage(
    name: ModelName,
    db: DbDep,
    reconciler: ReconcilerDep,
    guard: GuardDep,
    _: CurrentPrincipal,
    alias: str | None = Query(default=None, pattern=NAME_PATTERN, max_length=128),
    version: int | None = Query(default=None, ge=1, le=2**31 - 1),
) -> LineageOut:
    """A version (by alias, number, or the champion) joined with its evidence, decisions, moves and MLflow."""
    with db.read() as s:
        model = get_model(s, name)
        if version is None:
            row = s.scalar(
                select(Alias).where(Alias.model_id == model.id, Alias.alias == (alias or "champion"))
            )
            if row is None:
                raise Conflict(f"alias: {name}@{alias or 'champion'} does not exist; pass a version")
            version = row.version
        mv = get_version(s, model, version)
        ev = latest_evidence(s, mv.id)
        decisions = s.scalars(
            select(Decision).where(Decision.model_version_id == mv.id).order_by(Decision.id)
        ).all()
        audit = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.model_id == model.id, AuditEvent.to_version == mv.version)
            .order_by(AuditEvent.seq)
        ).all()
        out = LineageOut(
            model=name,
            version=version_out(model, mv),
            evidence=ev.model_dump(mode="json") if ev else None,
            decisions=[decision_out(s, model, d) for d in decisions],
            audit=[audit_out(e) for e in audit],
            mlflow={},
        )
    run_ids = {"registered": mv.run_id} if mv.run_id else {}
    model_ids = {"registered": mv.logged_model_id} if mv.logged_model_id else {}
    if ev is not None:
        run_ids.update(ev.lineage.mlflow_run_ids)
        model_ids.update(ev.lineage.logged_model_ids)
    out.mlflow = _mlflow_lineage(reconciler.mirror, guard, name, mv.version, run_ids, model_ids)
    return out


def _mlflow_lineage(
    mirror: MlflowMirror | None,
    guard: MlflowGuard,
    name: str,
    version: int,
    runs: dict[str, str],
    models: dict[str, str],
) -> dict[str, Any]:
    """Each MLflow read goes through ``guard`` (bounded; fails at once while MLflow is known to be down)."""
    if mirror is None:
        return {"error": "MLflow mirroring is disabled"}
    out: dict[str, Any] = {"runs": {}, "logged_models": {}}
    c = mirror.client
    try:
        mv = guard.call(c.get_model_version, name, str(version))
        out["model_version"] = {
            "source": mv.source,
            "run_id": mv.run_id,
            "tags": mv.tags,
            "aliases": list(mv.aliases),
        }
    except Exception as exc:
        out["model_version"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    for stage, rid in runs.items():
        try:
            r = guard.call(c.get_run, rid)
            out["runs"][stage] = {
                "run_id": rid,
                "status": r.info.status,
                "experiment_id": r.info.experiment_id,
                "metrics": r.data.metrics,
                "tags": {k: v for k, v in r.data.tags.items() if k.startswith(("oprd.", "lineage."))},
                "inputs": [d.dataset.name + "@" + d.dataset.digest for d in r.inputs.dataset_inputs]
                if r.inputs
                else [],
            }
        except Exception as exc:
            out["runs"][stage] = {"run_id": rid, "error": f"{type(exc).__name__}: {exc}"[:300]}
    for stage, mid in models.items():
        try:
            lm = guard.call(c.get_logged_model, mid)
            out["logged_models"][stage] = {
                "model_id": mid,
                "name": lm.name,
                "status": str(lm.status),
                "source_run_id": lm.source_run_id,
                "tags": lm.tags,
            }
        except Exception as exc:
            out["logged_models"][stage] = {"model_id": mid, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return out
