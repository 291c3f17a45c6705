"""Deployment settings of the registry service, read from the environment (``OPRD_*``) and nothing else.

This is the only place the service reads environment variables; everything else receives a ``ServerSettings``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def default_keyring() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "oprd-ci" / "trusted-keys"


class ServerSettings(BaseSettings):
    """Registry service settings; every field maps to ``OPRD_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="OPRD_", extra="forbid", frozen=True)

    database_url: str = "sqlite:///registry.db"
    """SQLAlchemy URL. ``sqlite:///<file>`` (embedded default, WAL) or ``postgresql+psycopg://...``."""
    mlflow_tracking_uri: str = Field(default_factory=_default_mlflow_uri)
    """Where aliases and model versions are mirrored. Default: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""
    mlflow_enabled: bool = True
    """``False`` keeps every outbox row pending (no MLflow calls); for diagnostics only."""
    admin_token: str | None = None
    """If set, a token with role ``admin`` named ``bootstrap-admin`` is ensured at startup (stored hashed)."""
    tokens: str | None = None
    """Extra tokens ensured at startup: ``name:role:secret`` entries separated by commas."""
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    """Requests with a larger body are refused with 413 before they are parsed."""
    auto_rollback: bool = False
    """Roll the champion back automatically when new evidence about it violates the policy."""
    artifact_roots: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [Path.cwd()])
    """Local directories under which registered artifacts must live (JSON list or comma-separated)."""
    reconcile_interval_s: float = Field(default=2.0, gt=0)
    """Background reconciler period: pending outbox rows are retried at least this often."""
    reconcile_pass_deadline_s: float = Field(default=10.0, gt=0)
    """Bound on one reconciler pass (all the MLflow writes it makes plus the drift check); the rest waits."""
    mlflow_write_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on one MLflow write call (one REST request: one attempt; retries are the outbox's, with backoff)."""
    mlflow_retry_base_s: float = Field(default=1.0, gt=0)
    """A failed write is tried again after ``base * 2**(attempts-1)`` seconds, at most ``mlflow_retry_max_s``."""
    mlflow_retry_max_s: float = Field(default=300.0, gt=0)
    mlflow_internal_error_attempts: int = Field(default=3, ge=1)
    """A write MLflow answers with a server error (500 / INTERNAL_ERROR) this many times is parked."""
    mlflow_retry_budget_s: float = Field(default=86_400.0, gt=0)
    """A write still failing (MLflow unreachable, 429/503) this long after its first failure is parked."""
    mlflow_pending_grace_s: float = Field(default=30.0, ge=0)
    """``/health`` reports ``degraded`` once a write has been pending longer than this (or is failing, parked)."""
    mlflow_validate_timeout_s: float = Field(default=2.0, gt=0)
    """Bound on the registration-time check that a ``models:/`` source's LoggedModel exists (past it: accepted,
    and the applier re-validates)."""
    sync_wait_s: float = Field(default=0.1, ge=0)
    """After a mutation commits, wait up to this long for *its own* MLflow writes before answering; past it the
    answer carries ``OPRD-MLflow: pending`` and the reconciler applies them later."""
    mlflow_request_timeout_s: float = Field(default=2.0, gt=0)
    """Bound on one MLflow read made inside a request (``status``, ``lineage``); past it the read reports an error
    (and counts towards the circuit breaker)."""
    mlflow_request_budget_s: float = Field(default=5.0, gt=0)
    """Bound on *all* MLflow reads of one request together (``lineage`` of a version with many linked runs): reads
    the budget does not reach are skipped and the answer says ``mlflow_read.state: partial`` (or ``unavailable``)."""
    mlflow_read_concurrency: int = Field(default=8, ge=1)
    """MLflow reads in flight at once in one process (``lineage`` reads its runs concurrently up to this)."""
    mlflow_exit_drain_s: float = Field(default=30.0, ge=0)
    """An in-process CLI command (no ``--url``) applies its pending MLflow writes before it exits for at most this
    long (for a remote store, after a first read shows MLflow answers within ``mlflow_request_timeout_s``); what is
    left stays in the outbox for the next registry process."""
    mlflow_breaker_failures: int = Field(default=3, ge=1)
    """Consecutive failed MLflow reads in requests that open the circuit breaker."""
    mlflow_breaker_open_s: float = Field(default=10.0, gt=0)
    """While the breaker is open, request-path MLflow reads fail at once with the last error."""
    token_cache_s: float = Field(default=5.0, ge=0)
    """Token lookups are cached this long (a rotated or revoked token keeps working at most this long)."""
    public_docs: bool | None = None
    """Serve ``/openapi.json``, ``/docs`` and ``/redoc`` without a token. Default: only when no token is configured."""
    trusted_keys_dir: Path = Field(default_factory=default_keyring)
    """The registry's keyring: public keys (``*.pub`` PEM) artifacts may be signed by; a policy's
    ``signing.trusted_keys`` picks among them by fingerprint. Admin-managed (``oprd-ci keys add``); default
    ``~/.config/oprd-ci/trusted-keys`` (``bash scripts/setup.sh`` adds the local development key)."""
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    """Bound on one webhook POST (connect + answer). A delivery is leased for twice this plus a second, so a
    process killed mid-POST leaves it to the next deliverer after that long."""
    webhook_poll_s: float = Field(default=0.5, gt=0)
    """How often the background deliverer looks for new events and due retries."""
    webhook_retry_base_s: float = Field(default=1.0, gt=0)
    """Retry backoff: ``base * 2**(attempts-1)`` seconds (with +-20 % jitter), capped by ``webhook_retry_max_s``."""
    webhook_retry_max_s: float = Field(default=300.0, gt=0)
    webhook_max_attempts: int = Field(default=20, ge=1)
    """After this many failed attempts a delivery is ``dead`` (kept and shown by ``oprd-ci events``)."""
    retirement_interval_s: float | None = Field(default=None, gt=0)
    """If set, ``serve`` applies every model's ``retirement:`` policy rules this often (the retirement watcher)."""
    watch_interval_s: float | None = Field(default=None, gt=0)
    """If set, ``oprd-ci serve`` also runs ``oprd-ci watch`` (triggers -> queued cycles, docs/triggers.md) on the
    DVC project ``watch_repo`` this often, against this registry's database."""
    watch_repo: Path = Field(default_factory=Path.cwd)
    """The DVC project the watcher of ``serve`` queues cycles in (default: the working directory)."""
    sqlite_busy_timeout_ms: int = Field(default=30_000, gt=0)
    db_pool_size: int = Field(default=20, gt=0)

    @field_validator("artifact_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        return value

    @field_validator("artifact_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in value]
