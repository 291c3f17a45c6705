"""Registered models and versions: lookup, locking, registration with hash verification, retirement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.artifacts import ArtifactError, VerifiedArtifact, resolve_artifact_path, verify_artifact
from server.errors import Conflict, Invalid, NotFound
from server.events import add_audited
from server.orm import Alias, AuditEvent, ModelVersion, Policy, RegisteredModel, enqueue
from server.policy import InvalidStoredPolicy, PolicySpec, stored_policy
from server.schemas import RegisterVersionIn
from server.settings import ServerSettings
from server.sources import validate_source

if TYPE_CHECKING:  # annotations only: the status query imports this module without the web framework
    from server.auth import Principal


_LOCKED = "oprd.locked_models"


def lock_model(s: Session, name: str) -> RegisteredModel | None:
    """Lock the model row (PostgreSQL ``FOR UPDATE``; SQLite's write lock is already held) and remember it in the
    session, so later lock requests in the same transaction reuse the locked row instead of another round trip
    (the lock lasts until commit or rollback, and a locked row cannot change under us). None: no such model."""
    locked = s.info.setdefault(_LOCKED, {})
    if name in locked:
        return locked[name]
    model = s.scalar(select(RegisteredModel).where(RegisteredModel.name == name).with_for_update())
    if model is not None:
        locked[name] = model  # a strong reference also keeps it in the identity map
    return model


def get_model(s: Session, name: str, *, lock: bool = False) -> RegisteredModel:
    """The model row; ``lock`` takes a row lock (PostgreSQL) that serialises writers of this model."""
    model = (
        lock_model(s, name) if lock else s.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    )
    if model is None:
        raise NotFound(f"name: model {name!r} is not registered")
    return model


def lock_or_create_model(s: Session, name: str) -> RegisteredModel:
    model = lock_model(s, name)
    if model is None:
        model = RegisteredModel(name=name)
        s.add(model)
        s.flush()  # a concurrent creator gets a unique violation here; Database.transact retries
        s.info.setdefault(_LOCKED, {})[name] = model
    return model


def get_version(s: Session, model: RegisteredModel, version: int) -> ModelVersion:
    mv = s.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
    )
    if mv is None:
        raise NotFound(f"version: {model.name} has no version {version}")
    return mv


def next_audit_seq(model: RegisteredModel) -> int:
    """Gapless per-model audit sequence; the caller holds the model lock."""
    model.audit_seq += 1
    return model.audit_seq


def verify_registered(mv: ModelVersion) -> None:
    """Recompute the hashes of a registered version; raise Conflict naming the mismatch."""
    try:
        verify_artifact(Path(mv.artifact_path), mv.files)
    except ArtifactError as exc:
        raise Conflict(f"artifact integrity of v{mv.version}: {exc}") from exc


def prepare_registration(settings: ServerSettings, body: RegisterVersionIn) -> tuple[VerifiedArtifact, str]:
    """Resolve and hash the artifact directory (outside any transaction: large files must not hold the
    write lock); returns the verified manifest and the MLflow source to record. Raises Invalid."""
    try:
        path = resolve_artifact_path(body.artifact_path, settings.artifact_roots)
        verified = verify_artifact(path)
    except ArtifactError as exc:
        raise Invalid(str(exc)) from exc
    if body.mlflow_source is not None:
        validate_source(body.mlflow_source, body.mlflow_run_id, body.logged_model_id)
    if body.mlflow_source is None and settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        # An MLflow server refuses local-path sources (CVE-2023-1177 fix); a row it refuses would block the outbox.
        raise Invalid(
            "mlflow_source: required with a remote MLflow server (e.g. runs:/<run_id>/<path> of the logged artifact)"
        )
    return verified, body.mlflow_source or str(path)


def record_version(
    s: Session, who: Principal, name: str, body: RegisterVersionIn, verified: VerifiedArtifact, source: str
) -> ModelVersion:
    """Record a verified artifact as the next version of ``name`` (creating the model), or return the
    version already registered with the same manifest sha256 (registration is idempotent by content)."""
    model = lock_or_create_model(s, name)
    existing = s.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.manifest_sha256 == verified.sha256
        )
    )
    if existing is not None:
        _check_same_links(existing, body)
        return existing
    mv = ModelVersion(
        model_id=model.id,
        version=model.next_version,
        artifact_path=str(verified.path),
        manifest_sha256=verified.sha256,
        files=verified.files,
        mlflow_source=source,
        run_id=body.mlflow_run_id,
        logged_model_id=body.logged_model_id,
        teacher=body.teacher,
        created_by=who.name,
    )
    model.next_version += 1
    s.add(mv)
    tags = {"oprd.manifest_sha256": verified.sha256}
    if body.logged_model_id:
        tags["oprd.logged_model_id"] = body.logged_model_id
    enqueue(
        s,
        "create_version",
        name,
        {
            "version": mv.version,
            "source": source,
            "run_id": body.mlflow_run_id,
            "logged_model_id": body.logged_model_id,
            "tags": tags,
        },
    )
    s.flush()
    return mv


def _check_same_links(mv: ModelVersion, body: RegisterVersionIn) -> None:
    """Registration is idempotent by content, but a request that names *other* MLflow links for the same
    content is refused rather than silently answered with the old ones (omitted links claim nothing)."""
    for field, given, stored in (
        ("mlflow_source", body.mlflow_source, mv.mlflow_source),
        ("mlflow_run_id", body.mlflow_run_id, mv.run_id),
        ("logged_model_id", body.logged_model_id, mv.logged_model_id),
    ):
        if given is not None and given != stored:
            raise Conflict(
                f"{field}: this manifest is already v{mv.version} with {field} {stored!r}; "
                f"register different content or use the recorded {field}"
            )


def retire(
    s: Session, who: Principal, model: RegisteredModel, versions: list[ModelVersion], reason: str
) -> list[str]:
    """Mark ``versions`` RETIRED (not eligible for promote/rollback) with one audit row each.

    Aliases are not moved (a retirement is not a move); returns ``alias->version`` strings of aliases that
    still point at a retired version so the caller can roll them back.
    """
    for mv in versions:
        if mv.status == "RETIRED":
            continue
        mv.status, mv.retired_reason = "RETIRED", reason
        add_audited(  # the audit row and its event (server.events)
            s,
            model,
            AuditEvent(
                model_id=model.id,
                seq=next_audit_seq(model),
                action="retire",
                to_version=mv.version,
                actor=who.name,
                role=who.role,
                reason=reason,
            ),
        )
        enqueue(
            s,
            "set_version_tag",
            model.name,
            {"version": mv.version, "key": "oprd.status", "value": "RETIRED"},
        )
    retired = {mv.version for mv in versions}
    aliases = s.scalars(select(Alias).where(Alias.model_id == model.id)).all()
    return [f"{a.alias}->v{a.version}" for a in aliases if a.version in retired]


def ensure_ready(mv: ModelVersion) -> None:
    if mv.status != "READY":
        raise Conflict(
            f"version: v{mv.version} is {mv.status} ({mv.retired_reason or 'no reason'}) and cannot be aliased"
        )


def checked_policy(model: RegisteredModel, policy: Policy) -> PolicySpec:
    """The stored ``policy`` parsed under today's bounds; a row that fails them (stored before a bound existed)
    is a 409 naming the field, so no gate runs a policy that could make the decision itself fail."""
    try:
        return stored_policy(policy.spec, model.name, policy.version)
    except InvalidStoredPolicy as exc:
        raise Conflict(str(exc)) from exc
