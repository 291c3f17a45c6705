"""Alias moves: compare-and-set on the alias revision, one audit row and one outbox row per move, all in the
caller's transaction. Rollback is a new event (a move back), never a deletion of history."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from server.auth import Principal
from server.errors import Conflict, Forbidden, Invalid, NotFound
from server.events import add_audited
from server.orm import Alias, AuditEvent, Decision, ModelVersion, Policy, RegisteredModel, enqueue, utcnow
from server.registry import ensure_ready, get_model, get_version, next_audit_seq

MOVE_ACTIONS = ("promote", "rollback", "auto_rollback")
# MLflow 3.x's own alias rules (mlflow/utils/validation.py: _REGISTERED_MODEL_ALIAS_REGEX,
# _validate_model_alias_name_reserved): only [\w-] characters; "latest" (any case) and v<N>/V<N> are reserved.
_MLFLOW_ALIAS = re.compile(r"^[\w\-]+$", re.ASCII)
_MLFLOW_VERSION_ALIAS = re.compile(r"^[vV]\d+$")


def mlflow_alias_problem(alias: str) -> str | None:
    """Why MLflow can never hold ``alias`` (so the registry refuses it up front), or ``None``."""
    if alias.lower() == "latest":
        return "'latest' (any case) is reserved by MLflow (models:/<name>/latest means the newest version)"
    if _MLFLOW_VERSION_ALIAS.match(alias):
        return f"{alias!r} is reserved by MLflow (v<N> names version N)"
    if not _MLFLOW_ALIAS.match(alias):
        return f"{alias!r}: MLflow aliases may only contain letters, digits, '_' and '-'"
    return None


def check_alias(alias: str) -> None:
    """Raise ``Invalid`` (422) for an alias MLflow can never hold (see :func:`mlflow_alias_problem`)."""
    if (why := mlflow_alias_problem(alias)) is not None:
        raise Invalid(f"alias: {why}")


@dataclass(frozen=True)
class Move:
    action: str
    to_version: int
    expected_revision: int
    reason: str
    decision_id: int | None = None
    policy_version: int | None = None
    override: bool = False


def get_alias(s: Session, model: RegisteredModel, alias: str, *, lock: bool = False) -> Alias | None:
    """The alias row; ``lock`` takes its row lock, once per transaction (a locked row is remembered in the session
    and cannot change under us, so later lock requests reuse it without a round trip)."""
    stmt = select(Alias).where(Alias.model_id == model.id, Alias.alias == alias)
    locked = s.info.setdefault("oprd.locked_aliases", {})
    if (model.id, alias) in locked:
        return locked[(model.id, alias)]
    if not lock:
        return s.scalar(stmt)
    row = s.scalar(stmt.with_for_update())
    if row is not None:
        locked[(model.id, alias)] = row
    return row


def check_revision(s: Session, model: RegisteredModel, alias: str, expected_revision: int) -> None:
    """Lock the alias and raise the compare-and-set's Conflict when it is not at ``expected_revision``.

    Called right after the model lock, before the other reads of a move: under load most moves lose the race,
    and each of them used to read the version, the policy and the decision under the model lock before failing,
    which lengthened the queue of every writer of the model. A stale revision is therefore reported before a missing version or a
    policy refusal (the client re-reads, then gets those)."""
    row = get_alias(s, model, alias, lock=True)
    current = row.revision if row is not None else 0
    if expected_revision != current:
        raise stale_revision(model, alias, current, expected_revision)


def stale_revision(model: RegisteredModel, alias: str, current: int, expected: int) -> Conflict:
    return Conflict(f"expected_revision: {model.name}@{alias} is at revision {current}, not {expected}")


def revision_passed(s: Session, model: RegisteredModel, alias: str, expected_revision: int) -> int | None:
    """The alias's revision when it is already past ``expected_revision`` in this (read) snapshot, else None.

    Revisions only grow (one per move, rows are never deleted), so such a move is certain to lose its
    compare-and-set: the routes refuse it from a read snapshot, without hashing the artifact or queueing on the
    model lock (under load most moves are such lost races)."""
    row = get_alias(s, model, alias)
    current = row.revision if row is not None else 0
    return current if current > expected_revision else None


def move_alias(s: Session, who: Principal, model: RegisteredModel, alias: str, move: Move) -> Alias:
    """CAS the alias from ``move.expected_revision`` to ``revision + 1``; write the audit and outbox rows.

    The caller holds the model lock. Raises Invalid (422) for an alias MLflow can never hold, Conflict on a
    stale revision or a no-op move.
    """
    check_alias(alias)
    row = get_alias(s, model, alias, lock=True)
    current = row.revision if row is not None else 0
    if move.expected_revision != current:
        raise stale_revision(model, alias, current, move.expected_revision)
    from_version = row.version if row is not None else None
    if from_version == move.to_version:
        raise Conflict(f"version: {model.name}@{alias} already points to v{move.to_version}")
    if row is None:
        row = Alias(model_id=model.id, alias=alias, version=move.to_version, revision=1)
        s.add(row)
        s.flush()
    else:
        now = utcnow()
        res = s.execute(
            update(Alias)
            .where(Alias.id == row.id, Alias.revision == current)
            .values(version=move.to_version, revision=current + 1, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # belt and braces: the lock should make this impossible
            raise Conflict(f"expected_revision: {model.name}@{alias} changed concurrently")
        # the row now holds exactly these values: record them without another SELECT (or a second UPDATE)
        for key, value in (("version", move.to_version), ("revision", current + 1), ("updated_at", now)):
            set_committed_value(row, key, value)
    add_audited(  # the audit row and its event (server.events), in this transaction
        s,
        model,
        AuditEvent(
            model_id=model.id,
            seq=next_audit_seq(model),
            action=move.action,
            alias=alias,
            from_version=from_version,
            to_version=move.to_version,
            alias_revision=row.revision,
            actor=who.name,
            role=who.role,
            reason=move.reason,
            decision_id=move.decision_id,
            policy_version=move.policy_version,
            override=move.override,
        ),
    )
    enqueue(s, "set_alias", model.name, {"alias": alias, "version": move.to_version})
    return row


def current_policy(s: Session, model: RegisteredModel) -> Policy | None:
    """The newest policy of ``model``. The row stays referenced by the session (``s.info``) so that later
    ``s.get(Policy, id)`` calls in the same transaction (submit, the decision view) hit the identity map, which
    only holds objects someone references, instead of the database."""
    policy = s.scalar(
        select(Policy).where(Policy.model_id == model.id).order_by(Policy.version.desc()).limit(1)
    )
    if policy is not None:
        s.info.setdefault("oprd.policies", {})[policy.id] = policy
    return policy


def check_promotable(
    s: Session, who: Principal, model: RegisteredModel, mv: ModelVersion, *, override: bool
) -> tuple[Decision | None, Policy | None]:
    """The decision that allows promoting ``mv`` under the current policy, or raise Conflict/Forbidden.

    An override skips the policy but needs the admin role; it is recorded on the audit row.
    """
    ensure_ready(mv)
    policy = current_policy(s, model)
    decision = s.scalar(
        select(Decision).where(Decision.model_version_id == mv.id).order_by(Decision.id.desc()).limit(1)
    )
    if override:
        if not who.at_least("admin"):
            raise Forbidden("override: only the admin role may promote against the policy")
        return decision, policy
    if policy is None:
        raise Conflict(f"policy: {model.name} has no policy; an admin must set one (oprd-ci policy set)")
    if decision is None:
        raise Conflict(f"gate: v{mv.version} has no decision; submit evidence first (oprd-ci gate)")
    if decision.policy_id != policy.id:
        raise Conflict(
            f"gate: v{mv.version} was decided under an older policy; resubmit evidence for policy v{policy.version}"
        )
    if decision.verdict != "PROMOTE":
        failing = [
            f"{c['criterion']}{'/' + c['suite'] if c.get('suite') else ''}"
            for c in decision.criteria
            if c["status"] in ("FAIL", "INCONCLUSIVE")
        ]
        raise Conflict(
            f"gate: v{mv.version} decision {decision.id} is {decision.verdict} (failing: {', '.join(failing)})"
        )
    return decision, policy


def promote(
    s: Session,
    who: Principal,
    name: str,
    alias: str,
    *,
    version: int,
    expected_revision: int,
    reason: str,
    override: bool,
    under_lock: Callable[[RegisteredModel], None] | None = None,
) -> Alias:
    """Point ``alias`` at ``version`` when its latest decision allows it under the current policy (or ``override``),
    compare-and-set on ``expected_revision``. ``under_lock(model)`` runs first, under the model lock this takes (the
    route's policy-unchanged check), so the row is locked once per request."""
    model = get_model(s, name, lock=True)
    if under_lock is not None:
        under_lock(model)
    check_revision(s, model, alias, expected_revision)
    mv = get_version(s, model, version)
    decision, policy = check_promotable(s, who, model, mv, override=override)
    return move_alias(
        s,
        who,
        model,
        alias,
        Move(
            action="promote",
            to_version=version,
            expected_revision=expected_revision,
            reason=reason,
            decision_id=decision.id if decision else None,
            policy_version=policy.version if policy else None,
            override=override,
        ),
    )


def rollback_target(s: Session, model: RegisteredModel, alias: str, to_version: int | None) -> int:
    """The version a rollback of ``alias`` goes to.

    Default: walking the alias history backwards from the latest promotion of the current version, the
    previous *promoted* READY version (so repeated rollbacks step back through promotions, not toggle).
    With ``to_version``: it must have been pointed to by this alias before and still be READY.
    """
    row = get_alias(s, model, alias)
    if row is None:
        raise NotFound(f"alias: {model.name}@{alias} does not exist")
    moves = select(AuditEvent.seq, AuditEvent.to_version).where(
        AuditEvent.model_id == model.id, AuditEvent.alias == alias
    )
    ready = set(
        s.scalars(
            select(ModelVersion.version).where(
                ModelVersion.model_id == model.id, ModelVersion.status == "READY"
            )
        )
    )
    if to_version is not None:
        was_there = s.scalar(
            moves.where(AuditEvent.action.in_(MOVE_ACTIONS), AuditEvent.to_version == to_version).limit(1)
        )
        if was_there is None:
            raise Conflict(f"to_version: v{to_version} was never {model.name}@{alias}")
        if to_version not in ready:
            raise Conflict(f"to_version: v{to_version} is retired")
        return to_version
    # Newest promotions first, streamed: the anchor and the target are nearly always among the last few, and
    # the history grows with every move (reading all of it made rollbacks slower over time).
    promotions = s.execute(
        moves.where(AuditEvent.action == "promote")
        .order_by(AuditEvent.seq.desc())
        .execution_options(yield_per=32)
    )
    anchored = False
    for _seq, version in promotions:
        if not anchored:
            anchored = version == row.version
        elif version != row.version and version in ready:
            promotions.close()
            return version
    raise Conflict(f"to_version: {model.name}@{alias} has no earlier promoted READY version to roll back to")


def rollback(
    s: Session,
    who: Principal,
    name: str,
    alias: str,
    *,
    expected_revision: int,
    reason: str,
    to_version: int | None,
    action: str = "rollback",
    decision_id: int | None = None,
) -> Alias:
    model = get_model(s, name, lock=True)
    check_revision(s, model, alias, expected_revision)
    target = rollback_target(s, model, alias, to_version)
    return move_alias(
        s,
        who,
        model,
        alias,
        Move(
            action=action,
            to_version=target,
            expected_revision=expected_revision,
            reason=reason,
            decision_id=decision_id,
        ),
    )
