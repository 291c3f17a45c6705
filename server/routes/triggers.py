"""Triggers of distill-and-gate cycles (``server.triggers``): submit (de-duplicated), list, claim, report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from server.auth import CurrentPrincipal
from server.deps import DbDep, ModelName
from server.idempotency import run_mutation
from server.registry import get_model
from server.triggers import (
    ClaimIn,
    StateIn,
    SubmitOut,
    TriggerIn,
    TriggerOut,
    claim_cycle,
    list_triggers,
    set_state,
    submit_trigger,
    trigger_out,
)

router = APIRouter(prefix="/v1", tags=["triggers"])
LimitQuery = Annotated[int, Query(ge=1, le=10_000)]
TriggerPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="Trigger id")]


class ClaimOut(BaseModel):
    trigger: TriggerOut | None
    """The cycle to queue now; ``None`` when a cycle is already queued or running, or nothing is pending."""


@router.post("/models/{name}/triggers", name="submit_trigger", response_model=SubmitOut)
def submit(name: ModelName, body: TriggerIn, request: Request, who: CurrentPrincipal) -> JSONResponse:
    """Record an observed trigger; a known ``key`` returns the existing row (``created: false``)."""

    def work(s: Session) -> SubmitOut:
        row, created = submit_trigger(s, who, name, body)
        return SubmitOut(created=created, trigger=trigger_out(s, get_model(s, name), row))

    return run_mutation(request, who, name, work)


@router.get("/models/{name}/triggers", name="list_triggers", response_model=list[TriggerOut])
def list_route(name: ModelName, db: DbDep, _: CurrentPrincipal, limit: LimitQuery = 100) -> list[TriggerOut]:
    """The newest ``limit`` triggers of a model, oldest first, each with its experiment and decision."""
    with db.read() as s:
        return list_triggers(s, name, limit)


@router.post("/models/{name}/triggers/claim", name="claim_trigger", response_model=ClaimOut)
def claim(name: ModelName, body: ClaimIn, request: Request, who: CurrentPrincipal) -> JSONResponse:
    """Make the pending triggers one queued cycle, unless one is queued or running (at most one per model)."""

    def work(s: Session) -> ClaimOut:
        t = claim_cycle(s, name, body.exp_prefix)
        return ClaimOut(trigger=trigger_out(s, get_model(s, name), t) if t is not None else None)

    return run_mutation(request, who, name, work)


@router.post(
    "/models/{name}/triggers/{trigger_id}/state", name="set_trigger_state", response_model=TriggerOut
)
def state(
    name: ModelName, trigger_id: TriggerPath, body: StateIn, request: Request, who: CurrentPrincipal
) -> JSONResponse:
    """The watcher's report on a cycle: ``running``, or ``failed`` with the reason."""

    def work(s: Session) -> TriggerOut:
        return trigger_out(s, get_model(s, name), set_state(s, name, trigger_id, body))

    return run_mutation(request, who, name, work)
