"""Triggers: events that ask for one distill-and-gate cycle of a model, de-duplicated, one cycle at a time.

The watcher (``pipelines.watch``, ``oprd-ci watch``) observes the sources (a new MLflow version of the teacher, a
changed teacher manifest, a grown failure bank, a policy change) and submits each observation here with a stable
``dedup_key``; this module is the part that must be right under concurrency, so it lives in the registry's
database and runs under the model lock (``server.registry.lock_model``):

- :func:`submit_trigger`: the same ``(model, dedup_key)`` is one row however often, by however many watchers, it
  is submitted. The first observation of a source that asks for it (``baseline``) is recorded as the reference
  (status ``baseline``) and starts nothing.
- :func:`claim_cycle`: if the model has no ``queued`` / ``running`` trigger, the pending ones become one cycle: the
  newest is the cycle's trigger (status ``queued``, ``exp_name`` set, the older ones' overrides under its own)
  and the older ones are ``coalesced`` into it. At most one cycle per model is ever queued or running.
- :func:`link_decision`: the gate (``POST /v1/gate?trigger_id=``) links the decision it made to the trigger in the
  decision's own transaction (status ``done``): trigger -> experiment -> decision.
- :func:`set_state`: the watcher reports ``running``, or ``failed`` with the reason (the experiment failed, or
  finished without a decision).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.auth import Principal
from server.errors import Conflict, Invalid, NotFound
from server.orm import Decision, ModelVersion, RegisteredModel, Trigger, utcnow
from server.registry import get_model, lock_or_create_model

TriggerKind = Literal["teacher_version", "teacher_manifest", "failure_bank", "policy"]
TriggerStatus = Literal["baseline", "pending", "coalesced", "queued", "running", "done", "failed"]
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "coalesced", "baseline")


class TriggerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: TriggerKind
    key: Annotated[str, Field(min_length=3, max_length=512, pattern=r"^[^\x00\s]+$")]
    """The de-duplication key, e.g. ``teacher-version:<name>/<version>``."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """``{dotted params key: value}`` the cycle runs with."""
    info: dict[str, Any] = Field(default_factory=dict)
    detail: Annotated[str, Field(max_length=2000)] = ""
    baseline: bool = False
    """True: when the model has no trigger of this kind yet, record this one as the reference (no cycle)."""


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exp_prefix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")] = (
        "watch"
    )


class StateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["running", "failed"]
    error: Annotated[str | None, Field(max_length=4000)] = None


class TriggerOut(BaseModel):
    id: int
    model: str
    kind: str
    key: str
    status: str
    overrides: dict[str, Any]
    info: dict[str, Any]
    detail: str
    exp_name: str | None
    coalesced_into: int | None
    decision_id: int | None
    verdict: str | None
    """The linked decision's verdict and version (``None`` until the gate decided)."""
    version: int | None
    error: str | None
    created_by: str
    created_at: datetime
    queued_at: datetime | None
    finished_at: datetime | None


class SubmitOut(BaseModel):
    created: bool
    """False: the key was known (the answer is the existing row)."""
    trigger: TriggerOut


def trigger_out(s: Session, model: RegisteredModel, t: Trigger) -> TriggerOut:
    verdict = version = None
    if t.decision_id is not None:
        row = s.execute(
            select(Decision.verdict, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == Decision.model_version_id)
            .where(Decision.id == t.decision_id)
        ).first()
        if row is not None:
            verdict, version = row
    return TriggerOut(
        id=t.id, model=model.name, kind=t.kind, key=t.dedup_key, status=t.status, overrides=t.overrides,
        info=t.info, detail=t.detail, exp_name=t.exp_name, coalesced_into=t.coalesced_into,
        decision_id=t.decision_id, verdict=verdict, version=version, error=t.error, created_by=t.created_by,
        created_at=t.created_at, queued_at=t.queued_at, finished_at=t.finished_at,
    )  # fmt: skip


def submit_trigger(s: Session, who: Principal, name: str, body: TriggerIn) -> tuple[Trigger, bool]:
    """The row of ``(name, body.key)``, created ``pending`` (or ``baseline``) if new; ``(row, created)``.

    The model is created if the registry does not know it yet (a first teacher version may come before any
    gate). Runs under the model lock, so two watchers submitting one key make one row.
    """
    model = lock_or_create_model(s, name)
    row = s.scalar(select(Trigger).where(Trigger.model_id == model.id, Trigger.dedup_key == body.key))
    if row is not None:
        return row, False
    first_of_kind = (
        s.scalar(select(Trigger.id).where(Trigger.model_id == model.id, Trigger.kind == body.kind).limit(1))
        is None
    )
    row = Trigger(
        model_id=model.id, kind=body.kind, dedup_key=body.key, overrides=body.overrides, info=body.info,
        detail=body.detail, status="baseline" if body.baseline and first_of_kind else "pending",
        created_by=who.name, created_at=utcnow(),
    )  # fmt: skip
    if row.status == "baseline":
        row.finished_at = row.created_at
    s.add(row)
    s.flush()
    return row, True


def active_trigger(s: Session, model: RegisteredModel) -> Trigger | None:
    return s.scalar(
        select(Trigger).where(Trigger.model_id == model.id, Trigger.status.in_(ACTIVE)).order_by(Trigger.id)
    )


def claim_cycle(s: Session, name: str, exp_prefix: str) -> Trigger | None:
    """Turn the model's pending triggers into one queued cycle, unless a cycle is queued or running (then, and
    without pending triggers, ``None``). The newest pending trigger owns the cycle; its overrides are applied
    over the older ones' (a newer teacher version wins); the older ones become ``coalesced`` into it."""
    model = get_model(s, name, lock=True)
    if active_trigger(s, model) is not None:
        return None
    pending = list(
        s.scalars(
            select(Trigger)
            .where(Trigger.model_id == model.id, Trigger.status == "pending")
            .order_by(Trigger.id)
        )
    )
    if not pending:
        return None
    head, older = pending[-1], pending[:-1]
    merged: dict[str, Any] = {}
    for t in pending:
        merged.update(t.overrides)
    now = utcnow()
    for t in older:
        t.status, t.coalesced_into, t.finished_at = "coalesced", head.id, now
    head.overrides = merged
    head.status, head.queued_at = "queued", now
    head.exp_name = f"{exp_prefix}-{model.name}-t{head.id}"[:128]
    s.flush()
    return head


def get_trigger(s: Session, model: RegisteredModel, trigger_id: int) -> Trigger:
    t = s.get(Trigger, trigger_id)
    if t is None or t.model_id != model.id:
        raise NotFound(f"trigger: {model.name} has no trigger {trigger_id}")
    return t


def set_state(s: Session, name: str, trigger_id: int, body: StateIn) -> Trigger:
    """``queued -> running``, or ``queued | running -> failed``. A finished trigger is not reopened (409)."""
    model = get_model(s, name, lock=True)
    t = get_trigger(s, model, trigger_id)
    if t.status == body.status:
        return t
    if t.status not in ACTIVE or (body.status == "running" and t.status != "queued"):
        raise Conflict(f"trigger {trigger_id} is {t.status}; it cannot become {body.status}")
    t.status = body.status
    if body.status == "failed":
        t.error, t.finished_at = (body.error or "failed")[:4000], utcnow()
    return t


def check_link(s: Session, model: RegisteredModel, trigger_id: int) -> Trigger:
    """The trigger a gate request names: it must be this model's and not finished (422 otherwise, before any
    decision is made)."""
    t = s.get(Trigger, trigger_id)
    if t is None or t.model_id != model.id:
        raise Invalid(f"trigger_id: {model.name} has no trigger {trigger_id}")
    if t.status not in ACTIVE:
        raise Invalid(f"trigger_id: trigger {trigger_id} is {t.status}; only a queued or running cycle links")
    return t


def link_decision(s: Session, model: RegisteredModel, trigger_id: int, decision: Decision) -> Trigger:
    """Link ``decision`` to the trigger of its cycle, in the decision's transaction (status ``done``)."""
    t = check_link(s, model, trigger_id)
    t.decision_id, t.status, t.finished_at = decision.id, "done", utcnow()
    return t


def list_triggers(s: Session, name: str, limit: int) -> list[TriggerOut]:
    model = get_model(s, name)
    rows = s.scalars(
        select(Trigger).where(Trigger.model_id == model.id).order_by(Trigger.id.desc()).limit(limit)
    ).all()
    return [trigger_out(s, model, t) for t in reversed(rows)]
