"""Alias moves (promote, rollback) and the read views over them (status, history, lineage)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import aliases as ops
from server.auth import CurrentPrincipal, Principal
from server.cost_history import CostHistoryRow, cost_history
from server.db import Database
from server.deps import AliasName, DbDep, GuardDep, ModelName, ReconcilerDep, SettingsDep
from server.errors import Conflict
from server.gating import ensure_policy_unchanged, latest_evidence, verify_signing
from server.idempotency import has_record, run_mutation
from server.mlflow_guard import Deadline, MlflowGuard
from server.mlflow_mirror import MlflowMirror
from server.names import NAME_PATTERN
from server.orm import Alias, AuditEvent, Decision, RegisteredModel
from server.registry import ensure_ready, get_model, get_version, verify_registered
from server.schemas import AliasOut, AuditOut, LineageOut, PromoteIn, RollbackIn, StatusOut
from server.settings import ServerSettings
from server.status import model_status as status_query
from server.views import alias_out, audit_out, decision_out, mlflow_read_out, version_out

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/models/{name}", tags=["aliases"])


def _refuse_lost_race(
    s: Session,
    request: Request,
    who: Principal,
    model: RegisteredModel,
    alias: str,
    expected_revision: int,
) -> None:
    """Raise the 409 the write transaction would raise when the alias is already past ``expected_revision`` in
    this read snapshot (``ops.revision_passed``), unless the Idempotency-Key is on record (the transaction
    replays that answer). The alias is read before the key: under READ COMMITTED a move seen committed by the
    first read has its key record visible to the second (both commit together). Checked first, like the
    transaction's compare-and-set (``ops.check_revision``): a lost race is refused without hashing."""
    current = ops.revision_passed(s, model, alias, expected_revision)
    if current is not None and not has_record(s, request, who):
        raise ops.stale_revision(model, alias, current, expected_revision)


def _verify_before_move(
    db: Database,
    request: Request,
    who: Principal,
    name: str,
    alias: str,
    body: PromoteIn,
    settings: ServerSettings,
) -> int | None:
    """Returns the id of the policy the signing rule was checked under (None: no policy yet)."""
    # Refuse a lost race and check the hashes (and, when the policy requires it, the signature) outside the write
    # transaction (large artifacts must not hold the write lock).
    with db.read() as s:
        model = get_model(s, name)
        _refuse_lost_race(s, request, who, model, alias, body.expected_revision)
        mv = get_version(s, model, body.version)
        ensure_ready(mv)
        evidence = latest_evidence(s, mv.id)
    verify_registered(mv)
    # Promote: the policy's signing rule again, against the version's latest evidence.
    return verify_signing(
        db, settings, name, Path(mv.artifact_path), mv.manifest_sha256, evidence, error=Conflict
    )


@router.post("/aliases/{alias}/promote", name="promote", response_model=AliasOut)
def promote(
    name: ModelName,
    alias: AliasName,
    body: PromoteIn,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    who: CurrentPrincipal,
) -> JSONResponse:
    """Point the alias at a version whose latest decision is PROMOTE under the current policy (CAS on revision);
    the artifact's hashes and, when the policy requires it, its signature and attestation are re-verified."""
    ops.check_alias(alias)
    signing_policy = _verify_before_move(db, request, who, name, alias, body, settings)

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
            under_lock=lambda model: ensure_policy_unchanged(s, model, signing_policy),
        )
        return alias_out(s.get(RegisteredModel, row.model_id), row)  # identity map: no query

    return run_mutation(request, who, name, work)


@router.post("/aliases/{alias}/rollback", name="rollback", response_model=AliasOut)
def rollback(
    name: ModelName, alias: AliasName, body: RollbackIn, request: Request, db: DbDep, who: CurrentPrincipal
) -> JSONResponse:
    """Move the alias back to the previously promoted version, or to ``to_version`` from its history."""
    ops.check_alias(alias)
    with db.read() as s:  # one snapshot: target, lost race, the target's row
        model = get_model(s, name)
        _refuse_lost_race(s, request, who, model, alias, body.expected_revision)
        target = ops.rollback_target(s, model, alias, body.to_version)
        mv = get_version(s, model, target)
        ensure_ready(mv)
    verify_registered(mv)

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


@router.get("/cost-history", name="model_cost_history", response_model=list[CostHistoryRow])
def model_cost_history(
    name: ModelName,
    db: DbDep,
    _: CurrentPrincipal,
    alias: str = Query(default="champion", pattern=NAME_PATTERN, max_length=128),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> list[CostHistoryRow]:
    """Per version (the ``limit`` most recent, oldest first): accuracy per suite, tokens per response, cost, USD
    per accuracy point and the cost/length criteria its latest decision flagged (``server.cost_history``)."""
    with db.read() as s:
        return cost_history(s, get_model(s, name), alias, limit=limit)


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
    out.mlflow, deadline = _mlflow_lineage(reconciler.mirror, guard, name, mv.version, run_ids, model_ids)
    out.mlflow_read = mlflow_read_out(deadline)
    return out


def _mlflow_lineage(
    mirror: MlflowMirror | None,
    guard: MlflowGuard,
    name: str,
    version: int,
    runs: dict[str, str],
    models: dict[str, str],
) -> tuple[dict[str, Any], Deadline | None]:
    """The model version, the linked runs and LoggedModels as MLflow reports them, read concurrently through
    ``guard`` within ONE ``deadline`` for all of them: an entry whose read did not answer in time (or was skipped
    when the budget ran out, or refused by the open breaker) carries an ``error`` instead. Returns the entries and
    the deadline (``None``: mirroring is off, nothing was read)."""
    if mirror is None:
        return {"error": "MLflow mirroring is disabled"}, None
    c = mirror.client  # imports mlflow on first use (local CPU, once per process): before the budget starts
    deadline = guard.deadline()
    calls: dict[tuple[str, str], tuple[Any, tuple[object, ...]]] = {
        ("model_version", ""): (c.get_model_version, (name, str(version)))
    }
    calls.update({("runs", stage): (c.get_run, (rid,)) for stage, rid in runs.items()})
    calls.update({("logged_models", stage): (c.get_logged_model, (mid,)) for stage, mid in models.items()})
    answers = guard.call_all(calls, deadline)
    out: dict[str, Any] = {"runs": {}, "logged_models": {}}
    for (kind, stage), got in answers.items():
        ident = {"runs": {"run_id": runs.get(stage)}, "logged_models": {"model_id": models.get(stage)}}.get(
            kind, {}
        )
        if isinstance(got, BaseException):
            entry = {**ident, "error": f"{type(got).__name__}: {got}"[:300]}
        elif kind == "model_version":
            entry = {
                "source": got.source,
                "run_id": got.run_id,
                "tags": got.tags,
                "aliases": list(got.aliases),
            }
        elif kind == "runs":
            entry = {
                **ident,
                "status": got.info.status,
                "experiment_id": got.info.experiment_id,
                "metrics": got.data.metrics,
                "tags": {k: v for k, v in got.data.tags.items() if k.startswith(("oprd.", "lineage."))},
                "inputs": [d.dataset.name + "@" + d.dataset.digest for d in got.inputs.dataset_inputs]
                if got.inputs
                else [],
            }
        else:
            entry = {
                **ident,
                "name": got.name,
                "status": str(got.status),
                "source_run_id": got.source_run_id,
                "tags": got.tags,
            }
        if kind == "model_version":
            out["model_version"] = entry
        else:
            out[kind][stage] = entry
    return out, deadline
