"""Registry events: one CloudEvents 1.0 envelope per audited change, written in the change's own transaction.

Transactional outbox: ``record_event`` adds the ``events`` row to the session that also writes the alias move,
retirement or policy (and its audit row), so an event exists iff its change committed: a rolled-back
transaction leaves none, and a process killed after the commit leaves it for the deliverer
(``server.webhooks``) of the next process to send.

Envelope (CloudEvents field names)::

    {"specversion": "1.0", "id": "<uuid4>", "source": "/oprd-ci/registry", "type": "dev.oprd.registry.<action>",
     "time": "2026-12-03T11:20:00.123456Z", "subject": "<model>@<alias>" | "<model>/v<N>" | "<model>/policy",
     "datacontenttype": "application/json", "data": {...}}

``data``: ``model``, ``action`` (promote | rollback | auto_rollback | retire | policy_set), ``alias``,
``from_version`` / ``to_version`` (alias moves; ``null`` otherwise), ``version`` (the version the event is
about: the new alias target, or the retired version), ``alias_revision``, ``decision_id``, ``policy_id``,
``policy_version``, ``actor``, ``role``, ``reason``, ``override``, ``audit_seq`` (the audit row's gapless
per-model sequence) and ``links`` (API paths of the evidence: ``decision`` and ``lineage``).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.orm import AuditEvent, Decision, Policy, RegisteredModel, RegistryEvent, utcnow

SOURCE = "/oprd-ci/registry"
TYPE_PREFIX = "dev.oprd.registry."
EVENT_ACTIONS = ("promote", "rollback", "auto_rollback", "retire", "policy_set")
EVENT_TYPES = tuple(TYPE_PREFIX + a for a in EVENT_ACTIONS)


def _subject(model: RegisteredModel, audit: AuditEvent) -> str:
    if audit.alias is not None:
        return f"{model.name}@{audit.alias}"
    if audit.action == "retire":
        return f"{model.name}/v{audit.to_version}"
    return f"{model.name}/policy"


def _policy_id(s: Session, model: RegisteredModel, audit: AuditEvent) -> int | None:
    """The policy row behind the audit row: the decision's (identity map: no query on the promote path), else
    the model's policy of ``audit.policy_version``."""
    if audit.decision_id is not None:
        decision = s.get(Decision, audit.decision_id)
        if decision is not None:
            return decision.policy_id
    if audit.policy_version is None:
        return None
    return s.scalar(
        select(Policy.id).where(Policy.model_id == model.id, Policy.version == audit.policy_version)
    )


def record_event(s: Session, model: RegisteredModel, audit: AuditEvent) -> RegistryEvent:
    """Add the event of ``audit`` (one of ``EVENT_ACTIONS``) to the caller's transaction; returns the row.

    The caller holds the model lock and has filled ``audit`` (seq included); nothing is sent here.
    """
    if audit.action not in EVENT_ACTIONS:
        raise ValueError(f"no event type for audit action {audit.action!r}")
    now = audit.created_at or utcnow()
    is_move = audit.alias is not None
    version = audit.to_version
    links: dict[str, str] = {}
    if audit.decision_id is not None:
        links["decision"] = f"/v1/decisions/{audit.decision_id}"
    if version is not None:
        links["lineage"] = f"/v1/models/{model.name}/lineage?version={version}"
    data: dict[str, Any] = {
        "model": model.name,
        "action": audit.action,
        "alias": audit.alias,
        "from_version": audit.from_version if is_move else None,
        "to_version": version if is_move else None,
        "version": version,
        "alias_revision": audit.alias_revision,
        "decision_id": audit.decision_id,
        "policy_id": _policy_id(s, model, audit),
        "policy_version": audit.policy_version,
        "actor": audit.actor,
        "role": audit.role,
        "reason": audit.reason,
        "override": bool(audit.override),
        "audit_seq": audit.seq,
        "links": links,
    }
    event_id = str(uuid.uuid4())
    envelope = {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": TYPE_PREFIX + audit.action,
        "time": now.isoformat(timespec="microseconds") + "Z",
        "subject": _subject(model, audit),
        "datacontenttype": "application/json",
        "data": data,
    }
    row = RegistryEvent(
        event_id=event_id, model_id=model.id, type=envelope["type"], envelope=envelope, created_at=now
    )
    s.add(row)
    return row


def add_audited(s: Session, model: RegisteredModel, audit: AuditEvent) -> AuditEvent:
    """``s.add(audit)`` plus its event: the one call every audited change of ``EVENT_ACTIONS`` makes."""
    if audit.created_at is None:
        audit.created_at = utcnow()  # the event's ``time`` is the audit row's, to the microsecond
    s.add(audit)
    record_event(s, model, audit)
    return audit
