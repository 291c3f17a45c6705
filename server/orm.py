"""SQLAlchemy 2 tables of the registry. The database is the source of truth; MLflow mirrors it via the outbox.

Row-level invariants:
- ``aliases.revision`` is the alias's ETag: it starts at 1 and grows by exactly 1 per move (compare-and-set).
- ``audit_events.seq`` is gapless and strictly increasing per model (taken from ``registered_models.audit_seq``
  under the model row lock, not from a sequence, because sequences leave gaps on rollback).
- ``audit_events`` is append-only (the migration installs triggers that refuse UPDATE and DELETE).
- ``model_versions.version`` is assigned from ``registered_models.next_version`` under the same lock, so it
  equals the version number MLflow assigns when the outbox replays creations in order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(default=False)


class RegisteredModel(Base):
    __tablename__ = "registered_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    next_version: Mapped[int] = mapped_column(default=1)
    audit_seq: Mapped[int] = mapped_column(default=0)
    """Seq of the last audit event of this model (0 = none yet)."""


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version"),
        UniqueConstraint("model_id", "manifest_sha256"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    version: Mapped[int]
    artifact_path: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[dict[str, Any]]
    """``{relpath: sha256}`` as verified at registration."""
    mlflow_source: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(256))
    logged_model_id: Mapped[str | None] = mapped_column(String(256))
    teacher: Mapped[str | None] = mapped_column(String(256), index=True)
    """Teacher identity (name or artifact sha256) from the lineage, used to retire every student of a teacher."""
    status: Mapped[str] = mapped_column(String(16), default="READY")
    retired_reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Policy(Base):
    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("model_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    version: Mapped[int]
    spec: Mapped[dict[str, Any]]
    reason: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evidence(Base):
    __tablename__ = "evidence"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    payload: Mapped[dict[str, Any]]
    submitted_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Decision(Base):
    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    evidence_id: Mapped[int] = mapped_column(ForeignKey("evidence.id"))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    verdict: Mapped[str] = mapped_column(String(16))
    criteria: Mapped[list[Any]]
    champion_version: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    alias: Mapped[str] = mapped_column(String(128))
    version: Mapped[int]
    revision: Mapped[int]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (UniqueConstraint("model_id", "seq"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    seq: Mapped[int]
    action: Mapped[str] = mapped_column(String(32))
    """promote | rollback | auto_rollback | retire | policy_set"""
    alias: Mapped[str | None] = mapped_column(String(128))
    from_version: Mapped[int | None]
    to_version: Mapped[int | None]
    alias_revision: Mapped[int | None]
    actor: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"))
    policy_version: Mapped[int | None]
    override: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OutboxItem(Base):
    """A pending MLflow write. Applied in ``id`` order by the reconciler; every kind is idempotent.

    States: pending (``applied_at`` and ``parked_at`` NULL), applied (``applied_at`` set; also a row a later
    write of the same alias or tag superseded), or parked (``parked_at`` set, ``applied_at`` NULL): MLflow refused
    the write, or kept failing it past its budget; it stays visible in ``/health``, ``status``, the audit and
    ``oprd-ci outbox list`` until an admin retries or drops it, and the rows after it are still applied.
    A pending row that failed is tried again at ``next_attempt_at`` (per-row backoff, docs/registry.md).
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_pending", "applied_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    """create_version | set_alias | set_version_tag"""
    model_name: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    applied_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    parked_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    """A failed pending row is not tried before this (UTC); NULL = due now."""
    failing_since: Mapped[datetime | None]
    """First failure of the current run of failures (UTC); NULL once applied or never failed."""


_ENQUEUED = "oprd.outbox"


def enqueue(s: Session, kind: str, model_name: str, payload: dict[str, Any]) -> OutboxItem:
    """Add an outbox row and remember it on the session, so the request can wait for its own rows only."""
    item = OutboxItem(kind=kind, model_name=model_name, payload=payload)
    s.add(item)
    s.info.setdefault(_ENQUEUED, []).append(item)
    return item


def enqueued(s: Session) -> list[OutboxItem]:
    """The outbox rows this session added (ids are set once flushed)."""
    return list(s.info.get(_ENQUEUED, []))


class IdempotencyRecord(Base):
    """The stored outcome of a successful mutation, replayed for a retried ``Idempotency-Key``."""

    __tablename__ = "idempotency_keys"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    actor: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int]
    response: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegistryEvent(Base):
    """A CloudEvents 1.0 envelope (``envelope``) of one audited change, written in the transaction of that change
    (the transactional outbox of ``server.events``): it exists iff the change committed. Immutable once written;
    ``dispatched_at`` is set when the deliverer has created its ``event_deliveries`` rows (one per webhook
    subscribed at that moment)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_undispatched", "dispatched_at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    """The CloudEvents ``id`` (a UUID): also the ``webhook-id`` header, the receiver's de-duplication key."""
    model_id: Mapped[int | None] = mapped_column(ForeignKey("registered_models.id"), index=True)
    type: Mapped[str] = mapped_column(String(128))
    envelope: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None]


class Webhook(Base):
    """An admin-managed subscription. ``secret`` signs deliveries (HMAC needs it in clear; shown once at creation).
    Removing a webhook sets ``removed_at``: its delivery history stays readable, nothing more is sent."""

    __tablename__ = "webhooks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    types: Mapped[list[Any] | None] = mapped_column(JSON)
    """Event types to send (``None``: all)."""
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None]


class EventDelivery(Base):
    """One event to one webhook. States: ``pending`` (due at ``next_attempt_at``), ``delivered`` (a 2xx came
    back), ``dead`` (gave up after the configured attempts). ``lease_until``: a deliverer holds the row while
    its POST is in flight (another process, or a restarted one, takes it over after that instant)."""

    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("event_pk", "webhook_pk"),
        Index("ix_event_deliveries_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    event_pk: Mapped[int] = mapped_column(ForeignKey("events.id"))
    webhook_pk: Mapped[int] = mapped_column(ForeignKey("webhooks.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None]
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None]


class Trigger(Base):
    """An event that asks for one distill-and-gate cycle of a model (``server.triggers``; docs/triggers.md).

    ``dedup_key`` is unique per model: the same event seen twice is one row. States: ``baseline`` (the first
    observation of a source, recorded as the reference, no cycle), ``pending`` (waits for a cycle), ``coalesced``
    (folded into the cycle of ``coalesced_into``), ``queued`` / ``running`` (its DVC experiment ``exp_name``; at
    most one such row per model, taken under the model lock), ``done`` (``decision_id`` links the gate's
    decision) and ``failed`` (``error`` says why).
    """

    __tablename__ = "triggers"
    __table_args__ = (
        UniqueConstraint("model_id", "dedup_key"),
        Index("ix_triggers_model_status", "model_id", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id"))
    kind: Mapped[str] = mapped_column(String(32))
    """teacher_version | teacher_manifest | failure_bank | policy"""
    dedup_key: Mapped[str] = mapped_column(String(512))
    overrides: Mapped[dict[str, Any]]
    """``{params key: value}`` the cycle runs with (``dvc exp run -S``)."""
    info: Mapped[dict[str, Any]]
    """What the source observed (e.g. the bank's row count), for the next observation to compare with."""
    detail: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    exp_name: Mapped[str | None] = mapped_column(String(128))
    coalesced_into: Mapped[int | None] = mapped_column(ForeignKey("triggers.id"))
    decision_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
