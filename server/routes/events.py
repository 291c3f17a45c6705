"""Events with their delivery state, webhook subscriptions (admin), and retirement by policy (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.auth import CurrentPrincipal
from server.deps import DbDep, ModelName
from server.events import EVENT_TYPES
from server.idempotency import run_mutation
from server.names import NAME_PATTERN, Name, Reason
from server.orm import EventDelivery, RegistryEvent, Webhook
from server.registry import get_model
from server.retirement import apply_retirement_policy
from server.webhooks import add_webhook, delivery_counts, redeliver, remove_webhook

router = APIRouter(tags=["events"])
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
DeliveryState = Literal["pending", "delivered", "dead", "cancelled"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookIn(_In):
    name: Name
    url: Annotated[str, Field(min_length=8, max_length=2000, pattern=r"^https?://[^\s\x00]+$")]
    types: list[EventType] | None = Field(default=None, min_length=1)
    """Event types to send (default: all)."""


class WebhookOut(BaseModel):
    name: str
    url: str
    types: list[str] | None
    created_by: str
    created_at: datetime
    deliveries: dict[str, int] = Field(default_factory=dict)
    """Deliveries by state."""


class WebhookCreatedOut(WebhookOut):
    secret: str
    """``whsec_...``: verify ``webhook-signature`` with it. Shown only in this answer."""


class WebhookRemovedOut(BaseModel):
    name: str
    cancelled_deliveries: int


class RedeliverIn(_In):
    event: int | None = Field(default=None, ge=1, le=2**63 - 1)
    """Only this event (its ``seq`` in ``oprd-ci events``); default: every dead delivery of the webhook."""


class RedeliverOut(BaseModel):
    name: str
    redelivered: int


class DeliveryOut(BaseModel):
    webhook: str
    state: DeliveryState
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


class EventOut(BaseModel):
    seq: int
    """Registry-wide order of the events (the outbox row id)."""
    event: dict[str, Any]
    """The CloudEvents envelope, as delivered."""
    dispatched: bool
    """False until a deliverer fanned it out to the webhooks."""
    deliveries: list[DeliveryOut]


class RetirePolicyIn(_In):
    dry_run: bool = False
    reason: Reason | None = None
    """Appended to each retirement's audit reason (which always names the policy version and the rules)."""


class RetirePolicyOut(BaseModel):
    model: str
    policy_version: int | None
    retired: dict[int, str]
    """version -> the rules that matched (with ``dry_run``: what would be retired)."""
    protected: dict[int, str]
    """version -> why it was kept although a rule matched."""
    dry_run: bool


def _webhook_out(h: Webhook, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "name": h.name,
        "url": h.url,
        "types": h.types,
        "created_by": h.created_by,
        "created_at": h.created_at,
        "deliveries": counts,
    }


@router.get("/v1/events", name="list_events", response_model=list[EventOut])
def list_events(
    db: DbDep,
    _: CurrentPrincipal,
    model: str | None = Query(default=None, pattern=NAME_PATTERN, max_length=128),
    state: DeliveryState | None = Query(
        default=None, description="Only events with a delivery in this state."
    ),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> list[EventOut]:
    """The newest ``limit`` events (oldest first) with each delivery's state."""
    with db.read() as s:
        q = select(RegistryEvent).order_by(RegistryEvent.id.desc()).limit(limit)
        if model is not None:
            q = q.where(RegistryEvent.model_id == get_model(s, model).id)
        if state is not None:
            q = q.where(
                RegistryEvent.id.in_(select(EventDelivery.event_pk).where(EventDelivery.state == state))
            )
        events = list(reversed(s.scalars(q).all()))
        deliveries: dict[int, list[DeliveryOut]] = {}
        if events:
            rows = s.execute(
                select(EventDelivery, Webhook.name)
                .join(Webhook, Webhook.id == EventDelivery.webhook_pk)
                .where(EventDelivery.event_pk.in_([e.id for e in events]))
                .order_by(EventDelivery.id)
            )
            for d, hook in rows:
                deliveries.setdefault(d.event_pk, []).append(
                    DeliveryOut(
                        webhook=hook,
                        state=d.state,  # type: ignore[arg-type]
                        attempts=d.attempts,
                        last_status=d.last_status,
                        last_error=d.last_error,
                        next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
                        delivered_at=d.delivered_at,
                    )
                )
        return [
            EventOut(
                seq=e.id,
                event=e.envelope,
                dispatched=e.dispatched_at is not None,
                deliveries=deliveries.get(e.id, []),
            )
            for e in events
        ]


@router.post("/v1/webhooks", name="add_webhook", response_model=WebhookCreatedOut, status_code=201)
def create_webhook(body: WebhookIn, request: Request, who: CurrentPrincipal) -> JSONResponse:
    """Subscribe ``url`` to the events committed from now on; the answer holds the signing secret (only once)."""

    def work(s: Session) -> WebhookCreatedOut:
        hook, secret = add_webhook(s, who.name, body.name, body.url, body.types)
        return WebhookCreatedOut(**_webhook_out(hook, {}), secret=secret)

    return run_mutation(request, who, None, work, status_code=201)


@router.get("/v1/webhooks", name="list_webhooks", response_model=list[WebhookOut])
def list_webhooks(db: DbDep, _: CurrentPrincipal) -> list[WebhookOut]:
    """Active subscriptions (never their secrets) with their deliveries by state."""
    with db.read() as s:
        counts = delivery_counts(s)
        hooks = s.scalars(select(Webhook).where(Webhook.removed_at.is_(None)).order_by(Webhook.name)).all()
        return [WebhookOut(**_webhook_out(h, counts.get(h.id, {}))) for h in hooks]


@router.delete("/v1/webhooks/{webhook}", name="remove_webhook", response_model=WebhookRemovedOut)
def delete_webhook(
    webhook: Annotated[str, Path(pattern=NAME_PATTERN, max_length=128)],
    request: Request,
    who: CurrentPrincipal,
) -> JSONResponse:
    """Stop sending to ``webhook``; its pending deliveries are cancelled (history stays in ``/v1/events``)."""

    def work(s: Session) -> WebhookRemovedOut:
        hook, n = remove_webhook(s, webhook)
        return WebhookRemovedOut(name=hook.name, cancelled_deliveries=n)

    return run_mutation(request, who, None, work)


@router.post("/v1/webhooks/{webhook}/redeliver", name="redeliver_webhook", response_model=RedeliverOut)
def redeliver_webhook(
    webhook: Annotated[str, Path(pattern=NAME_PATTERN, max_length=128)],
    body: RedeliverIn,
    request: Request,
    who: CurrentPrincipal,
) -> JSONResponse:
    """Send ``webhook``'s dead deliveries again (same event ids, fresh attempts), e.g. after its receiver was
    fixed."""

    def work(s: Session) -> RedeliverOut:
        n = redeliver(s, webhook, body.event)
        return RedeliverOut(name=webhook, redelivered=n)

    out = run_mutation(request, who, None, work)
    deliverer = getattr(request.app.state, "deliverer", None)
    if deliverer is not None:
        deliverer.kick()
    return out


@router.post("/v1/models/{name}/retire-by-policy", name="retire_by_policy", response_model=RetirePolicyOut)
def retire_by_policy(
    name: ModelName, body: RetirePolicyIn, request: Request, who: CurrentPrincipal
) -> JSONResponse:
    """Apply the ``retirement`` block of the model's current policy (one audit row and one event per version);
    never the version an alias points to, nor an alias's rollback target."""

    def work(s: Session) -> RetirePolicyOut:
        plan = apply_retirement_policy(s, who, name, dry_run=body.dry_run, note=body.reason)
        return RetirePolicyOut(
            model=plan.model,
            policy_version=plan.policy_version,
            retired=plan.retire,
            protected=plan.protected,
            dry_run=body.dry_run,
        )

    return run_mutation(request, who, name, work)
