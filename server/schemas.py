"""Request and response bodies of the registry API. Every request model forbids unknown fields.

``EvidenceIn`` is also the file format of ``oprd-ci gate --evidence FILE.json`` (docs/contracts.md).
Scores are fractions in [0, 1]; lengths are tokens; costs are USD and device-hours.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.names import PRINTABLE_PATTERN, MlflowId, Name, Reason, SuiteName, VersionNumber
from server.policy import MAX_PROBLEMS, PolicySpec

Verdict = Literal["PROMOTE", "REJECT", "INCONCLUSIVE"]
Role = Literal["read", "ci", "admin"]
ShortStr = Annotated[str, Field(max_length=256, pattern=PRINTABLE_PATTERN)]
SourceUri = Annotated[str, Field(min_length=1, max_length=500, pattern=PRINTABLE_PATTERN)]
"""500 = the length of MLflow's own ``model_versions.source`` column."""
ArtifactPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=PRINTABLE_PATTERN)]
# MAX_PROBLEMS (server.policy): problems per suite and role. Bounds the decision's work and memory (the bootstrap is
# resamples x problems).


class _In(BaseModel):
    # Non-finite floats are not JSON; they must never reach the database or a response (issue 9, defect 4).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ------------------------------------------------------------------------------------------------ evidence
ProblemId = Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE_PATTERN)]
VersionKey = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,9}$")]
"""A registry version number as a JSON object key."""


class ProblemResult(_In):
    """One problem of one suite for one role: ``n_correct`` of ``k`` samples were graded correct."""

    problem_id: ProblemId
    k: Annotated[int, Field(strict=True, ge=1, le=100_000)]
    n_correct: Annotated[int, Field(strict=True, ge=0, le=100_000)]
    mean_length: Annotated[float, Field(ge=0.0, le=1e7)]
    """Mean response length of the k samples, in tokens."""

    @model_validator(mode="after")
    def _check(self) -> ProblemResult:
        if self.n_correct > self.k:
            raise ValueError(f"n_correct ({self.n_correct}) exceeds k ({self.k})")
        return self


Problems = Annotated[list[ProblemResult], Field(min_length=1, max_length=MAX_PROBLEMS)]


class SuiteEvidence(_In):
    """Per-problem results of one suite. ``champion`` is optional: by default the stored evidence of the
    current champion version is used, paired by ``problem_id``."""

    candidate: Problems
    teacher: Problems | None = None
    base: Problems | None = None
    """The untrained student (``student_base``) on the same problems; needed by a ``min_gap_closed`` policy."""
    champion: Problems | None = None
    recorded_failures: dict[VersionKey, Annotated[list[ProblemId], Field(max_length=MAX_PROBLEMS)]] | None = (
        Field(default=None, max_length=1000)
    )
    """Failure-bank regression suites: registry version (as a string) -> ids of this suite's problems recorded as
    failures of that version. The policy's ``min_fixed_fraction`` counts those of the champion the candidate now
    solves ("fixes N of M failures of v<champion>")."""

    @model_validator(mode="after")
    def _unique_ids(self) -> SuiteEvidence:
        for role in ("candidate", "teacher", "base", "champion"):
            rows = getattr(self, role) or []
            if len({r.problem_id for r in rows}) != len(rows):
                raise ValueError(f"{role}: duplicate problem_id")
        return self


class Cost(_In):
    device_hours: Annotated[float, Field(ge=0.0, le=1e9)]
    usd: Annotated[float, Field(ge=0.0, le=1e12)]


class EvalSuiteRecord(_In):
    """How one suite was scored: the sha256 of its file and ``{grader name: version}`` of the graders its rows
    use (``pipelines.suites.suite_record``)."""

    digest: ShortStr
    graders: dict[Name, ShortStr] = Field(default_factory=dict, max_length=16)


class Lineage(_In):
    """References into MLflow and the teacher identity; stored verbatim and joined by ``lineage``."""

    mlflow_run_ids: dict[Name, MlflowId] = Field(default_factory=dict, max_length=64)
    """Stage name -> MLflow run id (e.g. ``distill``, ``evaluate``)."""
    logged_model_ids: dict[Name, MlflowId] = Field(default_factory=dict, max_length=64)
    teacher: ShortStr | None = None
    """Teacher identity (name@sha256 or artifact sha256); ``retire --teacher`` matches it exactly."""
    student_base: ShortStr | None = None
    method: ShortStr | None = None
    """Distillation method (``distill.method``); compared with a signed attestation's ``method``."""
    dataset_digests: dict[Name, ShortStr] = Field(default_factory=dict, max_length=64)
    eval_suites: dict[SuiteName, EvalSuiteRecord] = Field(default_factory=dict, max_length=64)
    """Suite -> what its scores are comparable by (file digest, grader names and versions). Optional: evidence
    submitted before it existed stays valid."""


class EvidenceBody(_In):
    """Evidence about an already registered version."""

    suites: dict[SuiteName, SuiteEvidence] = Field(min_length=1, max_length=64)
    cost: Cost | None = None
    lineage: Lineage = Lineage()


class EvidenceIn(EvidenceBody):
    """The gate file: the candidate's artifact directory plus its evidence. Registers the version if new."""

    model: Name
    artifact_path: ArtifactPath
    mlflow_run_id: MlflowId | None = None
    logged_model_id: MlflowId | None = None
    mlflow_source: SourceUri | None = None
    """Model-version source for MLflow (e.g. ``models:/m-...``); default: the absolute artifact directory."""


# ------------------------------------------------------------------------------------------------ requests
class RegisterVersionIn(_In):
    artifact_path: ArtifactPath
    """Local directory with ``manifest.json``, under one of the allowed artifact roots."""
    mlflow_run_id: MlflowId | None = None
    logged_model_id: MlflowId | None = None
    mlflow_source: SourceUri | None = None
    teacher: ShortStr | None = None


class PromoteIn(_In):
    version: VersionNumber
    expected_revision: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]
    """The alias revision the caller saw (0 = the alias does not exist yet); stale -> 409."""
    reason: Reason
    override: bool = False
    """Promote despite the policy (admin only; recorded as an override)."""


class RollbackIn(_In):
    expected_revision: Annotated[int, Field(strict=True, ge=1, le=2**31 - 1)]
    reason: Reason
    to_version: VersionNumber | None = None
    """``None``: the version promoted before the current one."""


class RetireIn(_In):
    reason: Reason


class RetireTeacherIn(_In):
    teacher: ShortStr
    reason: Reason


class PolicySetIn(_In):
    spec: PolicySpec
    reason: Reason


class TokenCreateIn(_In):
    name: Name
    role: Role


# ------------------------------------------------------------------------------------------------ responses
class Criterion(BaseModel):
    """One row of a decision table. ``status`` NOT_APPLICABLE means the criterion had nothing to compare to."""

    criterion: str
    suite: str | None = None
    status: Literal["PASS", "FAIL", "INCONCLUSIVE", "NOT_APPLICABLE"]
    observed: float | None = None
    threshold: float | None = None
    detail: str


class DecisionOut(_Out):
    id: int
    model: str
    version: int
    verdict: Verdict
    policy_version: int
    policy_digest: str
    """``sha256:<hex>`` of the policy spec this decision applied (``server.policy.policy_digest``)."""
    champion_version: int | None
    criteria: list[Criterion]
    created_at: datetime
    trigger_id: int | None = None
    """The trigger whose cycle ended in this decision (``oprd-ci watch``; docs/triggers.md), if any."""


class VersionOut(_Out):
    model: str
    version: int
    artifact_path: str
    manifest_sha256: str
    mlflow_source: str
    run_id: str | None
    logged_model_id: str | None
    teacher: str | None
    status: str
    retired_reason: str | None
    created_by: str
    created_at: datetime


class AliasOut(_Out):
    model: str
    alias: str
    version: int
    revision: int
    updated_at: datetime


class GateOut(BaseModel):
    version: VersionOut
    decision: DecisionOut
    promoted: AliasOut | None
    """Set when the verdict was PROMOTE and the alias was moved by this call."""


class AuditOut(_Out):
    seq: int
    action: str
    alias: str | None
    from_version: int | None
    to_version: int | None
    alias_revision: int | None
    actor: str
    role: str
    reason: str
    decision_id: int | None
    policy_version: int | None
    override: bool
    created_at: datetime


class MlflowReadOut(BaseModel):
    """How complete the MLflow part of a read answer is (``status``, ``lineage``); the registry part is always
    complete and authoritative."""

    state: Literal["ok", "partial", "unavailable", "off"]
    """``ok`` MLflow answered every read; ``partial`` some reads did not answer within their bound; ``unavailable``
    none did; ``off`` MLflow was not read (``mlflow=false`` or mirroring disabled)."""
    budget_s: float
    """The request's total budget for MLflow reads (``OPRD_MLFLOW_REQUEST_BUDGET_S``)."""
    answered: int
    missing: int
    """Reads that timed out, failed, were refused by the breaker, or were skipped when the budget ran out."""


class StatusOut(BaseModel):
    model: str
    aliases: list[AliasOut]
    champion: VersionOut | None
    champion_decision: DecisionOut | None
    champion_since: datetime | None
    versions: int
    pending_mlflow_writes: int
    parked_mlflow_writes: int
    """Writes MLflow refused for this model (``mlflow_parked`` in its history); MLflow lacks them for good."""
    mlflow_aliases: dict[str, int] | None
    """Aliases as MLflow reports them right now (``None`` when MLflow could not be read)."""
    last_mlflow_error: str | None
    mlflow_state: Literal["ok", "degraded"] = "ok"
    """``degraded`` while this model's MLflow writes are parked, failing, or pending past the grace (as ``/health``)."""
    oldest_pending_age_s: float | None = None
    """Seconds since this model's oldest pending MLflow write was committed (``None``: nothing pending)."""
    mlflow_read: MlflowReadOut | None = None


class PolicyOut(BaseModel):
    model: str
    version: int
    spec: PolicySpec
    digest: str
    """``sha256:<hex>`` of ``spec`` in canonical JSON (``server.policy.policy_digest``)."""
    reason: str
    created_by: str
    created_at: datetime


class LineageOut(BaseModel):
    model: str
    version: VersionOut
    evidence: dict[str, Any] | None
    decisions: list[DecisionOut]
    audit: list[AuditOut]
    mlflow: dict[str, Any]
    """What MLflow reports for the linked runs / logged models / model version (or an ``error``)."""
    mlflow_read: MlflowReadOut | None = None


class TokenOut(BaseModel):
    name: str
    role: Role
    token: str
    """Shown once; only its sha256 is stored."""


class ReconcileOut(BaseModel):
    applied: int
    pending: int
    parked: int
    """Rows MLflow refused (see the ``mlflow_parked`` audit events); they are not retried."""
    errors: list[str]
    drift_fixed: list[str]


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    """``degraded``: MLflow writes are parked, failing, or pending longer than ``OPRD_MLFLOW_PENDING_GRACE_S``
    (the registry itself still serves; the database is the source of truth)."""
    database: str
    pending_mlflow_writes: int
    parked_mlflow_writes: int
    failing_mlflow_writes: int = 0
    """Pending writes whose last attempt failed (each waits for its own next attempt)."""
    oldest_pending_age_s: float | None = None
    """Seconds since the oldest pending MLflow write was committed (``None``: nothing pending)."""
    last_mlflow_error: str | None
    reconcile_pass_running_s: float | None = None
    """How long the reconciler's current pass has been running (``None``: between passes)."""
    counts_age_s: float
    """Age of the counts: 0 when read from the database for this answer; the age of the last pass's counts when
    the database did not answer within a second."""
    pending_webhook_deliveries: int | None = None
    """Event deliveries to active webhooks not yet acknowledged (``None``: the database did not answer in time)."""
    dead_webhook_deliveries: int | None = None
    """Deliveries that used up their attempts: ``degraded`` until redelivered (``oprd-ci webhooks redeliver``) or
    the webhook is removed; a subscriber missed those events."""
    oldest_pending_delivery_age_s: float | None = None
    """Seconds since the oldest event still pending delivery was committed."""


class OutboxRowOut(BaseModel):
    id: int
    kind: str
    model: str
    payload: dict[str, Any]
    state: Literal["pending", "parked", "dropped"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    parked_at: datetime | None


class OutboxActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Reason
