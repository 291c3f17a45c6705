"""A model's status (aliases, the champion's decision, MLflow agreement): the query behind ``GET
/v1/models/{name}/status`` and ``oprd-ci status``.

It depends on SQLAlchemy and the registry's own modules only, not on the web framework, so the CLI's in-process
``status`` (the command people run every day) answers without importing FastAPI or building the app: with
:func:`server.mlflow_aliases.read_aliases` and :func:`server.migrate.upgrade`'s one-query check it starts in about
a second on a small machine instead of three (docs/registry.md "CLI start-up").
"""

from __future__ import annotations

import re

from sqlalchemy import func, select

from server.db import Database
from server.errors import Invalid
from server.mlflow_guard import Deadline, MlflowGuard, MlflowUnavailable
from server.mlflow_mirror import MlflowMirror
from server.names import NAME_PATTERN
from server.orm import Alias, AuditEvent, Decision, ModelVersion, OutboxItem
from server.reconciler import OutboxStats
from server.registry import get_model
from server.schemas import StatusOut
from server.settings import ServerSettings
from server.views import alias_out, decision_out, mlflow_read_out, version_out

__all__ = ["local_status", "model_status"]


def model_status(
    db: Database,
    name: str,
    *,
    mirror: MlflowMirror | None,
    guard: MlflowGuard,
    reconciler_error: str | None = None,
    mlflow: bool = True,
    deadline: Deadline | None = None,
    pending_grace_s: float = 30.0,
) -> StatusOut:
    """Aliases (with revisions), the champion with its decision, the outbox backlog, and (``mlflow``) the aliases
    MLflow holds. Raises ``NotFound`` for an unknown model. An MLflow failure is reported in
    ``last_mlflow_error`` (``mlflow_aliases`` stays ``None``) and ``mlflow_read``: the database state is
    authoritative. The MLflow read is bounded by ``deadline`` (default: the guard's request budget).
    ``mlflow_state`` is ``degraded`` while this model's writes are parked, failing or pending past
    ``pending_grace_s`` seconds."""
    with db.read() as s:
        model = get_model(s, name)
        rows = s.scalars(select(Alias).where(Alias.model_id == model.id).order_by(Alias.alias)).all()
        champ = next((a for a in rows if a.alias == "champion"), None)
        champ_mv = (
            s.scalar(
                select(ModelVersion).where(
                    ModelVersion.model_id == model.id, ModelVersion.version == champ.version
                )
            )
            if champ
            else None
        )
        last_move = (
            s.scalar(
                select(AuditEvent)
                .where(AuditEvent.model_id == model.id, AuditEvent.alias == "champion")
                .order_by(AuditEvent.seq.desc())
                .limit(1)
            )
            if champ
            else None
        )
        decision = s.get(Decision, last_move.decision_id) if last_move and last_move.decision_id else None
        n_versions = (
            s.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model.id))
            or 0
        )
        unapplied = s.execute(
            select(
                OutboxItem.parked_at.is_not(None),
                func.count(),
                func.min(OutboxItem.created_at),
                func.count(OutboxItem.last_error),
            )
            .where(OutboxItem.model_name == name, OutboxItem.applied_at.is_(None))
            .group_by(OutboxItem.parked_at.is_not(None))
        ).all()
        counts = {bool(parked): (n, oldest, failing) for parked, n, oldest, failing in unapplied}
        pending, oldest_at, failing = counts.get(False, (0, None, 0))
        parked = counts.get(True, (0, None, 0))[0]
        backlog = OutboxStats(pending=pending, parked=parked, failing=failing, oldest_pending_at=oldest_at)
        # this model's oldest MLflow error on record: the root cause (a parked row's refusal, or a pending row's outage)
        model_error = s.scalar(
            select(OutboxItem.last_error)
            .where(
                OutboxItem.model_name == name,
                OutboxItem.applied_at.is_(None),
                OutboxItem.last_error.is_not(None),
            )
            .order_by(OutboxItem.id)
            .limit(1)
        )
        out = StatusOut(
            model=name,
            aliases=[alias_out(model, a) for a in rows],
            champion=version_out(model, champ_mv) if champ_mv else None,
            champion_decision=decision_out(s, model, decision) if decision else None,
            champion_since=champ.updated_at if champ else None,
            versions=n_versions,
            pending_mlflow_writes=pending,
            parked_mlflow_writes=parked,
            mlflow_aliases=None,
            last_mlflow_error=guard.last_error or model_error or (reconciler_error if pending else None),
            mlflow_state=backlog.state(pending_grace_s),
            oldest_pending_age_s=backlog.oldest_pending_age_s(),
        )
    if mlflow and mirror is not None:
        deadline = deadline or guard.deadline()
        try:
            out.mlflow_aliases = guard.call(mirror.aliases, name, deadline=deadline)
        except Exception as exc:  # MLflow down: report it, the DB state above is still authoritative
            out.last_mlflow_error = (str(exc) if isinstance(exc, MlflowUnavailable) else f"MLflow: {exc}")[
                :500
            ]
        out.mlflow_read = mlflow_read_out(deadline)
    else:
        out.mlflow_read = mlflow_read_out(None)
    return out


def local_status(settings: ServerSettings, name: str, *, mlflow: bool = True) -> StatusOut:
    """:func:`model_status` on the registry database of ``settings``, in this process (the CLI without
    ``--url``): migrates the database first like the app does; raises ``RegistryError`` subclasses like the API."""
    from server.migrate import upgrade

    if not re.fullmatch(NAME_PATTERN, name):
        raise Invalid(f"name: {name!r} does not match {NAME_PATTERN}")
    db = Database(settings)
    guard = MlflowGuard.from_settings(settings)
    try:
        upgrade(db.engine)
        mirror = MlflowMirror(settings.mlflow_tracking_uri) if settings.mlflow_enabled else None
        return model_status(
            db,
            name,
            mirror=mirror,
            guard=guard,
            mlflow=mlflow,
            pending_grace_s=settings.mlflow_pending_grace_s,
        )
    finally:
        guard.shutdown()
        db.dispose()
