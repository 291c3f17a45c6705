"""Retirement by policy: which versions the ``retirement:`` block of a model's current policy retires.

Never retired, whatever the rules say: a version any alias of the model points to (the champion among them), and
the version each alias would roll back to (``server.aliases.rollback_target``), so a rollback stays possible.
Every other READY version is retired when at least one rule that is set matches; each retirement is one audit row
and one event (``server.registry.retire``), in one transaction per model under the model lock.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.aliases import current_policy, rollback_target
from server.auth import Principal
from server.db import Database
from server.errors import Conflict, NotFound
from server.orm import Alias, AuditEvent, ModelVersion, RegisteredModel, utcnow
from server.policy import RetirementRule
from server.registry import checked_policy, get_model, retire

log = logging.getLogger(__name__)
_HEX = re.compile(r"([0-9a-f]{64})$")


@dataclass
class RetirementPlan:
    model: str
    policy_version: int | None
    retire: dict[int, str] = field(default_factory=dict)
    """version -> why (the matching rules)."""
    protected: dict[int, str] = field(default_factory=dict)
    """version -> why it is kept although a rule matches (alias target or rollback target)."""


def teacher_digest(teacher: str) -> str | None:
    """The sha256 hex of a teacher identity (``name@<hex>``, ``sha256:<hex>`` or ``<hex>``); None without one."""
    m = _HEX.search(teacher.strip().lower())
    return m.group(1) if m else None


def _retired_teachers(s: Session, teachers: set[str]) -> set[str]:
    """The identities among ``teachers`` whose manifest is registered here with every copy RETIRED."""
    digests = {t: d for t in teachers if (d := teacher_digest(t))}
    if not digests:
        return set()
    states: dict[str, set[str]] = {}
    for sha, status in s.execute(
        select(ModelVersion.manifest_sha256, ModelVersion.status).where(
            ModelVersion.manifest_sha256.in_(set(digests.values()))
        )
    ):
        states.setdefault(sha, set()).add(status)
    return {t for t, d in digests.items() if states.get(d) == {"RETIRED"}}


def _protected(s: Session, model: RegisteredModel) -> dict[int, str]:
    out: dict[int, str] = {}
    for a in s.scalars(select(Alias).where(Alias.model_id == model.id).order_by(Alias.alias)):
        out.setdefault(a.version, f"{model.name}@{a.alias} points to it")
        try:
            target = rollback_target(s, model, a.alias, None)
        except (Conflict, NotFound):
            continue
        out.setdefault(target, f"{model.name}@{a.alias} would roll back to it")
    return out


def plan_retirement(
    s: Session, model: RegisteredModel, rule: RetirementRule | None, *, now: datetime | None = None
) -> RetirementPlan:
    """What ``rule`` retires now among the READY versions of ``model`` (reads only)."""
    plan = RetirementPlan(model=model.name, policy_version=None)
    if rule is None:
        return plan
    now = now or utcnow()
    ready = s.scalars(
        select(ModelVersion)
        .where(ModelVersion.model_id == model.id, ModelVersion.status == "READY")
        .order_by(ModelVersion.version)
    ).all()
    promoted = sorted(
        s.scalars(
            select(AuditEvent.to_version).where(
                AuditEvent.model_id == model.id, AuditEvent.action == "promote"
            )
        )
    )
    gone_teachers = (
        _retired_teachers(s, {mv.teacher for mv in ready if mv.teacher}) if rule.teacher_retired else set()
    )
    protected = _protected(s, model)
    for mv in ready:
        why = []
        if rule.teacher_retired and mv.teacher in gone_teachers:
            why.append(f"teacher {mv.teacher} is retired")
        if rule.max_promotions_behind is not None:
            behind = sum(1 for v in promoted if v > mv.version)
            if behind > rule.max_promotions_behind:
                why.append(f"{behind} promotions behind (max {rule.max_promotions_behind})")
        if rule.max_age_days is not None:
            age = now - mv.created_at
            if age > timedelta(days=rule.max_age_days):
                why.append(f"{age.total_seconds() / 86400:.1f} days old (max {rule.max_age_days:g})")
        if not why:
            continue
        if mv.version in protected:
            plan.protected[mv.version] = protected[mv.version]
        else:
            plan.retire[mv.version] = "; ".join(why)
    return plan


def apply_retirement_policy(
    s: Session,
    who: Principal,
    name: str,
    *,
    dry_run: bool = False,
    note: str | None = None,
    now: datetime | None = None,
) -> RetirementPlan:
    """Plan under the model lock with the current policy's ``retirement`` block and (unless ``dry_run``) retire
    each planned version with its reason (``note`` appended): one audit row and one event per version."""
    model = get_model(s, name, lock=True)
    policy = current_policy(s, model)
    rule = checked_policy(model, policy).retirement if policy is not None else None
    plan = plan_retirement(s, model, rule, now=now)
    plan.policy_version = policy.version if policy is not None else None
    if dry_run or not plan.retire:
        return plan
    by_version = {
        mv.version: mv
        for mv in s.scalars(
            select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.version.in_(list(plan.retire))
            )
        )
    }
    for version, why in sorted(plan.retire.items()):
        reason = f"retirement policy v{policy.version}: {why}" + (f" ({note})" if note else "")
        retire(s, who, model, [by_version[version]], reason)
    return plan


WATCHER = Principal(name="system:retirement", role="admin")


class RetirementWatcher:
    """``oprd-ci serve`` with ``OPRD_RETIREMENT_INTERVAL_S`` set: applies every model's retirement rules every
    ``interval_s`` seconds as ``system:retirement`` (one transaction per model; what it retires is audited and
    emitted like a manual ``retire --apply-policy``)."""

    def __init__(self, db: Database, interval_s: float) -> None:
        self.db, self.interval_s = db, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="oprd-retirement", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_once(self) -> dict[str, list[int]]:
        """``{model: versions retired}`` of one pass over every model."""
        with self.db.read() as s:
            names = list(s.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)))
        out = {}
        for name in names:
            plan = self.db.transact(lambda s, n=name: apply_retirement_policy(s, WATCHER, n))
            if plan.retire:
                out[name] = sorted(plan.retire)
                log.info("retirement policy retired %s versions %s", name, out[name])
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # a model's bad state must not stop the watcher for the others next time
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("retirement watcher pass failed: %s", self.last_error)
