"""Webhook subscriptions and the deliverer that sends the event outbox (``server.events``) to them.

Guarantee: **at-least-once** delivery of every committed event to every webhook subscribed when the deliverer
fanned it out, marked ``delivered`` only after a 2xx answer. A delivery whose POST was cut short (timeout,
refused, non-2xx, or this process killed mid-POST) is retried with exponential backoff, with the *same*
``webhook-id`` (the CloudEvents ``id``) and the same body; receivers de-duplicate on that id to process each
event exactly once. Events of rolled-back transactions never exist, so they are never sent.

Request (Standard Webhooks signing, CloudEvents structured mode)::

    POST <url>
    content-type: application/cloudevents+json
    webhook-id: <event id>
    webhook-timestamp: <unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

with ``key`` = base64-decoded part of the subscription secret after ``whsec_`` (``verify_signature`` is the
receiver side). Several processes (``serve --workers N``) may run deliverers: a delivery is claimed by a
conditional UPDATE that sets a lease, so one POST is in flight per delivery at a time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from server.db import Database
from server.errors import Conflict, Invalid, NotFound
from server.orm import EventDelivery, RegistryEvent, Webhook, utcnow
from server.settings import ServerSettings

log = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"
_BATCH = 100
DELIVERY_STATES = ("pending", "delivered", "dead", "cancelled")


# ------------------------------------------------------------------------------------------------ signing
def new_secret() -> str:
    """``whsec_`` + base64 of 32 random bytes (the Standard Webhooks secret format)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_signature(
    secret: str, headers: dict[str, str], body: bytes, *, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """Receiver side: True when one ``v1`` signature in ``headers`` matches and the timestamp is within
    ``tolerance_s`` seconds of ``now`` (replay protection). ``headers`` keys are lower-case."""
    try:
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, sig) for sig in headers.get("webhook-signature", "").split())


def body_of(envelope: dict[str, Any]) -> bytes:
    """The POST body: the envelope as compact JSON with sorted keys (byte-identical on every retry)."""
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------ subscriptions
def validate_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:  # e.g. an unbalanced "[" (IPv6 literal)
        raise Invalid(f"url: {url!r} is not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise Invalid(f"url: {url!r} must be an absolute http(s) URL")
    if parts.username or parts.password:
        raise Invalid("url: credentials in the URL would be stored and shown in clear; use the signature")
    return url


def add_webhook(s: Session, who: str, name: str, url: str, types: list[str] | None) -> tuple[Webhook, str]:
    """Create the subscription ``name`` (or revive a removed one with a new URL and secret); returns it and its
    secret. Only events committed after this are sent to it. Raises Conflict if ``name`` is active."""
    validate_url(url)
    row = s.scalar(select(Webhook).where(Webhook.name == name).with_for_update())
    secret = new_secret()
    if row is not None and row.removed_at is None:
        raise Conflict(f"name: webhook {name!r} exists; remove it first (oprd-ci webhooks remove {name})")
    if row is None:
        row = Webhook(name=name, url=url, secret=secret, types=types, created_by=who)
        s.add(row)
    else:
        row.url, row.secret, row.types, row.created_by = url, secret, types, who
        row.created_at, row.removed_at = utcnow(), None
    s.flush()
    return row, secret


def remove_webhook(s: Session, name: str) -> tuple[Webhook, int]:
    """Stop sending to ``name``; its pending deliveries become ``cancelled``. Returns it and that count."""
    row = s.scalar(
        select(Webhook).where(Webhook.name == name, Webhook.removed_at.is_(None)).with_for_update()
    )
    if row is None:
        raise NotFound(f"name: no active webhook {name!r}")
    row.removed_at = utcnow()
    res = s.execute(
        update(EventDelivery)
        .where(EventDelivery.webhook_pk == row.id, EventDelivery.state == "pending")
        .values(state="cancelled", last_error="webhook removed")
        .execution_options(synchronize_session=False)
    )
    return row, res.rowcount


def delivery_counts(s: Session) -> dict[int, dict[str, int]]:
    """``{webhook id: {state: count}}``."""
    out: dict[int, dict[str, int]] = {}
    for wid, state, n in s.execute(
        select(EventDelivery.webhook_pk, EventDelivery.state, func.count()).group_by(
            EventDelivery.webhook_pk, EventDelivery.state
        )
    ):
        out.setdefault(wid, {})[state] = n
    return out


def redeliver(s: Session, name: str, event_seq: int | None = None) -> int:
    """Give the ``dead`` deliveries of the active webhook ``name`` (only event ``event_seq``'s when given) a fresh
    set of attempts: state ``pending``, attempts 0, due now. The same event id goes out again, so a receiver that
    de-duplicates on ``webhook-id`` still sees each event once. Returns how many were revived.

    Raises NotFound for an unknown or removed webhook, or an ``event_seq`` with no dead delivery to it."""
    row = s.scalar(select(Webhook).where(Webhook.name == name, Webhook.removed_at.is_(None)))
    if row is None:
        raise NotFound(f"name: no active webhook {name!r}")
    q = update(EventDelivery).where(EventDelivery.webhook_pk == row.id, EventDelivery.state == "dead")
    if event_seq is not None:
        q = q.where(EventDelivery.event_pk == event_seq)
    res = s.execute(
        q.values(state="pending", attempts=0, next_attempt_at=utcnow(), lease_until=None).execution_options(
            synchronize_session=False
        )
    )
    if event_seq is not None and res.rowcount == 0:
        raise NotFound(
            f"event: no dead delivery of event {event_seq} to webhook {name!r} (oprd-ci events --state dead)"
        )
    return res.rowcount


@dataclass(frozen=True)
class DeliveryStats:
    """Deliveries to active webhooks as ``/health`` reports them."""

    pending: int
    dead: int
    oldest_pending_at: datetime | None

    def oldest_pending_age_s(self) -> float | None:
        if self.oldest_pending_at is None:
            return None
        return round(max(0.0, (utcnow() - self.oldest_pending_at).total_seconds()), 3)


def delivery_stats(s: Session) -> DeliveryStats:
    """Pending and dead deliveries to active webhooks (a removed webhook's dead rows are history, not a fault)."""
    active = Webhook.removed_at.is_(None)
    base = (
        select(func.count()).select_from(EventDelivery).join(Webhook, Webhook.id == EventDelivery.webhook_pk)
    )
    pending, oldest = s.execute(
        select(func.count(), func.min(RegistryEvent.created_at))
        .select_from(EventDelivery)
        .join(Webhook, Webhook.id == EventDelivery.webhook_pk)
        .join(RegistryEvent, RegistryEvent.id == EventDelivery.event_pk)
        .where(active, EventDelivery.state == "pending")
    ).one()
    dead = s.scalar(base.where(active, EventDelivery.state == "dead")) or 0
    return DeliveryStats(pending=pending or 0, dead=dead, oldest_pending_at=oldest)


# ------------------------------------------------------------------------------------------------ delivery
@dataclass
class DeliveryResult:
    dispatched: int = 0
    """Events fanned out to deliveries in this pass."""
    delivered: int = 0
    failed: int = 0
    """Attempts in this pass that did not get a 2xx (retried later, or dead)."""
    due: int = 0
    """Deliveries still due now after this pass (0 = caught up; retries in backoff are not due)."""
    waiting: int = 0
    """Pending deliveries in backoff or leased by another deliverer."""


@dataclass(frozen=True)
class _Claim:
    delivery_id: int
    attempts: int
    url: str
    secret: str
    event_id: str
    envelope: dict[str, Any]


class Deliverer:
    """Sends pending deliveries; ``start()`` runs it every ``webhook_poll_s`` on a daemon thread, ``drain`` runs
    it in the caller (the in-process CLI) until caught up or out of time."""

    def __init__(self, db: Database, settings: ServerSettings) -> None:
        self.db, self.settings = db, settings
        self.lease_s = 2 * settings.webhook_timeout_s + 1.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass = threading.Lock()
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="oprd-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.lease_s)

    def kick(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(stop=self._stop)
            except Exception as exc:  # the database may be briefly unavailable: try again next period
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("webhook deliverer pass failed: %s", self.last_error)
            self._wake.wait(self.settings.webhook_poll_s)
            self._wake.clear()

    def drain(self, timeout_s: float) -> DeliveryResult:
        """Deliver until nothing is due now or ``timeout_s`` has passed (bounded: a dead receiver must not
        hang a CLI command; what is left stays pending in the database for the next deliverer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.run_once(deadline=deadline)
            if result.due == 0 or time.monotonic() >= deadline:
                return result

    def run_once(
        self, *, deadline: float | None = None, stop: threading.Event | None = None
    ) -> DeliveryResult:
        """One pass: fan out new events, then attempt every delivery due now (oldest event first)."""
        with (
            self._pass,
            httpx.Client(timeout=self.settings.webhook_timeout_s, follow_redirects=False) as http,
        ):
            # A read first: on SQLite a write transaction takes the one write lock, which an idle poll must not.
            if self._undispatched():
                result = DeliveryResult(dispatched=self.db.transact(self._dispatch))
            else:
                result = DeliveryResult()
            for delivery_id in self._due_ids():
                if (deadline is not None and time.monotonic() >= deadline) or (stop and stop.is_set()):
                    break
                claim = self.db.transact(lambda s, d=delivery_id: self._claim(s, d))
                if claim is None:
                    continue
                ok = self._attempt(http, claim)
                result.delivered += ok
                result.failed += not ok
            result.due, result.waiting = self._backlog()
        return result

    # ------------------------------------------------------------------------------------------- steps
    def _dispatch(self, s: Session) -> int:
        """Create one delivery per (new event, active webhook whose ``types`` match); mark the events dispatched.
        FOR UPDATE: a concurrent deliverer (another worker) waits, then no longer sees these events."""
        events = s.scalars(
            select(RegistryEvent)
            .where(RegistryEvent.dispatched_at.is_(None))
            .order_by(RegistryEvent.id)
            .limit(_BATCH)
            .with_for_update()
        ).all()
        if not events:
            return 0
        hooks = s.scalars(select(Webhook).where(Webhook.removed_at.is_(None))).all()
        now = utcnow()
        for ev in events:
            for hook in hooks:
                if hook.types is None or ev.type in hook.types:
                    s.add(EventDelivery(event_pk=ev.id, webhook_pk=hook.id, next_attempt_at=now))
            ev.dispatched_at = now
        return len(events)

    def _due_ids(self) -> list[int]:
        now = utcnow()
        with self.db.read() as s:
            return list(
                s.scalars(
                    select(EventDelivery.id)
                    .where(
                        EventDelivery.state == "pending",
                        EventDelivery.next_attempt_at <= now,
                        or_(EventDelivery.lease_until.is_(None), EventDelivery.lease_until < now),
                    )
                    .order_by(EventDelivery.event_pk, EventDelivery.id)
                    .limit(_BATCH)
                )
            )

    def _undispatched(self) -> bool:
        with self.db.read() as s:
            return (
                s.scalar(select(RegistryEvent.id).where(RegistryEvent.dispatched_at.is_(None)).limit(1))
                is not None
            )

    def _backlog(self) -> tuple[int, int]:
        """(due now, pending but in backoff or leased)."""
        now = utcnow()
        pending = EventDelivery.state == "pending"
        with self.db.read() as s:
            total = s.scalar(select(func.count()).where(pending)) or 0
            due = (
                s.scalar(
                    select(func.count()).where(
                        pending,
                        EventDelivery.next_attempt_at <= now,
                        or_(EventDelivery.lease_until.is_(None), EventDelivery.lease_until < now),
                    )
                )
                or 0
            )
        return due, total - due

    def _claim(self, s: Session, delivery_id: int) -> _Claim | None:
        """Take the lease on a due delivery (conditional UPDATE: exactly one deliverer wins) and count the
        attempt before sending, so an attempt cut short by a crash still counts toward the backoff."""
        now = utcnow()
        res = s.execute(
            update(EventDelivery)
            .where(
                EventDelivery.id == delivery_id,
                EventDelivery.state == "pending",
                or_(EventDelivery.lease_until.is_(None), EventDelivery.lease_until < now),
            )
            .values(lease_until=now + timedelta(seconds=self.lease_s), attempts=EventDelivery.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            return None
        d = s.get(EventDelivery, delivery_id)
        assert d is not None
        hook, ev = s.get(Webhook, d.webhook_pk), s.get(RegistryEvent, d.event_pk)
        assert hook is not None and ev is not None
        if hook.removed_at is not None:
            d.state, d.lease_until, d.last_error = "cancelled", None, "webhook removed"
            return None
        return _Claim(d.id, d.attempts, hook.url, hook.secret, ev.event_id, ev.envelope)

    def _attempt(self, http: httpx.Client, c: _Claim) -> bool:
        body = body_of(c.envelope)
        ts = int(time.time())
        headers = {
            "content-type": "application/cloudevents+json",
            "webhook-id": c.event_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(c.secret, c.event_id, ts, body),
            "user-agent": "oprd-ci-registry-webhooks/1",
        }
        status: int | None = None
        error: str | None = None
        try:
            r = http.post(c.url, content=body, headers=headers)
            status = r.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}: {r.text[:200]}"
        except (
            Exception
        ) as exc:  # any failure to POST (also httpx.InvalidURL) is a failed attempt, retried later
            error = f"{type(exc).__name__}: {exc}"[:500]
        self.db.transact(lambda s: self._settle(s, c, status, error))
        if error:
            self.last_error = f"{c.url}: {error}"
        return error is None

    def _settle(self, s: Session, c: _Claim, status: int | None, error: str | None) -> None:
        d = s.get(EventDelivery, c.delivery_id)
        assert d is not None
        now = utcnow()
        d.last_status, d.last_error, d.lease_until = status, error, None
        if error is None:
            d.state, d.delivered_at = "delivered", now
            return
        if c.attempts >= self.settings.webhook_max_attempts:
            d.state = "dead"
            return
        delay = min(
            self.settings.webhook_retry_base_s * 2 ** (c.attempts - 1), self.settings.webhook_retry_max_s
        )
        d.next_attempt_at = now + timedelta(seconds=delay * random.uniform(0.8, 1.2))
