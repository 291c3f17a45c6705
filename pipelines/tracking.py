"""MLflow tracking for the DVC stages: where the store is, whether it answers, and one run per stage.

Each DVC stage is its own process. A stage wraps its body in :class:`StageRun`, which

* resolves the tracking URI (:func:`resolve_tracking_uri`) and fails fast with a one-line fix when an HTTP
  tracking server is down (:func:`check_tracking_reachable`), instead of MLflow's minutes of retries;
* creates the experiment with an absolute artifact location (:func:`ensure_experiment`), so stages started
  from different working directories write to the same place;
* logs the resolved config as flattened params and the lineage tags in the ``oprd.*`` namespace
  (:func:`lineage_tags`), the upstream run ids read from the upstream stages' run-ref files
  (``pipelines.lineage``), and on exit the wall time, device-hours and cost;
* marks the run FAILED with ``oprd.failure_reason`` when the body raises (and re-raises).

Models, datasets and registration live in ``pipelines.tracking_models``, the per-step metric logger in
``pipelines.tracking_metrics``, run refs and the lineage picture in ``pipelines.lineage``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import httpx
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipelines.lineage import RunRef, read_run_ref, write_run_ref
from pipelines.mlflow_globals import process_uris
from pipelines.tracking_metrics import MlflowMetricLogger
from trainer.config import Params, TrackingConfig

__all__ = [
    "MAX_PARAM_VALUE",
    "StageRun",
    "TrackingUnreachable",
    "check_tracking_reachable",
    "configure_http_client",
    "ensure_experiment",
    "flatten_params",
    "git_state",
    "lineage_tags",
    "project_root",
    "repo_relative",
    "resolve_tracking_uri",
    "short_commit",
]

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000
"""MLflow's limit on one param value (characters); longer values are truncated with a marker."""
_MAX_TAG_VALUE = 5000  # run tags are limited to 8000 chars; failure reasons are cut well below that
_ROOT_MARKERS = ("dvc.yaml", ".dvc", ".git")


class TrackingUnreachable(RuntimeError):
    """The configured tracking store does not answer; the message names the URI and the fix."""


# ------------------------------------------------------------------------------------------ locations
def project_root(start: str | Path | None = None) -> Path:
    """The project root: the nearest directory at or above ``start`` (default: CWD) holding ``dvc.yaml``,
    ``.dvc`` or ``.git``; ``start`` itself when none does. Always absolute."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if any((d / m).exists() for m in _ROOT_MARKERS):
            return d
    return here


def resolve_tracking_uri(cfg: TrackingConfig, *, root: str | Path | None = None) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs project root>/mlflow.db``.

    A relative sqlite path (``sqlite:///mlflow.db``) is made absolute against the project root, so every
    stage process opens the same database whatever its working directory.
    """
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    base = Path(root).resolve() if root is not None else project_root()
    if uri is None:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if rel and rel != ":memory:":
            return f"sqlite:///{base / rel}"
    return uri


def default_artifact_location(uri: str, cfg: TrackingConfig | None = None) -> str | None:
    """Artifact root for a new experiment: ``cfg.artifact_location`` (made absolute), else
    ``<dir of the sqlite db>/mlartifacts`` for sqlite stores, else ``None`` (the server decides; over HTTP
    that is ``mlflow-artifacts:/`` proxied by the server)."""
    if cfg is not None and cfg.artifact_location:
        loc = cfg.artifact_location
        return loc if "://" in loc or loc.startswith("mlflow-artifacts:") else str(Path(loc).resolve())
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return str(db.parent / "mlartifacts")
    return None


# ------------------------------------------------------------------------------------------ reachability
def configure_http_client(cfg: TrackingConfig) -> None:
    """Make MLflow's HTTP client fail within ``cfg.timeout_s`` instead of retrying for minutes.

    MLflow retries a failed request 7 times with a doubling backoff by default (minutes of silence while a
    stage looks hung). Our callers retry on their own terms (``MlflowMetricLogger``), so one attempt plus one
    retry is enough here. Explicit environment settings win (``setdefault``): an operator can still raise them.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.timeout_s))))


def check_tracking_reachable(uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line naming the URI and the fix, when the tracking store cannot be used.

    ``http(s)``: ``GET <uri>/health`` must answer 200 within ``timeout_s``. ``sqlite``: the database's directory
    must exist and be writable (MLflow would otherwise fail deep inside alembic). Other schemes are not probed.

    Raises:
        TrackingUnreachable: the store cannot be reached.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        fix = (
            "start the server (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --backend-store-uri "
            "sqlite:///ABS/mlflow.db --workers 1 ...) or point tracking.uri / MLFLOW_TRACKING_URI at a live "
            "server or a sqlite:/// file"
        )
        try:
            r = httpx.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise TrackingUnreachable(
                f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}: {exc}); {fix}"
            ) from None
        if r.status_code != 200:
            raise TrackingUnreachable(
                f"MLflow tracking server {uri} answered /health with HTTP {r.status_code}; {fix}"
            )
    elif scheme == "sqlite":
        path = uri[len("sqlite:///") :]
        if path and path != ":memory:":
            parent = Path(path).parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise TrackingUnreachable(
                    f"MLflow sqlite store {uri}: directory {parent} is missing or not writable; create it "
                    "or set tracking.uri / MLFLOW_TRACKING_URI elsewhere"
                )


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, creating it with ``artifact_location`` when missing.

    Two stages may race to create it (``dvc exp run --jobs 2``): the loser re-reads the winner's id.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ------------------------------------------------------------------------------------------ params / tags
def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"distill": {"rep": {"k": 8}}}`` -> ``{"distill.rep.k": "8"}``.

    Lists and ``None`` are JSON-encoded (``[1, 2]``, ``null``) so they read back unambiguously; a value longer
    than :data:`MAX_PARAM_VALUE` is cut and ends with ``...<truncated N chars>`` (MLflow rejects longer ones).
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, dotted + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if len(text) > MAX_PARAM_VALUE:
            marker = f"...<truncated {len(text)} chars>"
            text = text[: MAX_PARAM_VALUE - len(marker)] + marker
        out[dotted] = text
    return out


def repo_relative(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to the project root when it lies inside it (what tags and metrics files record, so
    they read the same on every machine), else the absolute path (an external model directory).

    Inside a queued DVC experiment (a temporary workspace at ``<repo>/.dvc/tmp/exps/<name>``), a path in the
    repository that queued it (e.g. a teacher ``oprd-ci watch`` downloaded to ``teachers/``) is recorded relative
    to that repository."""
    base = Path(root).resolve() if root is not None else project_root()
    p = Path(path)
    p = (p if p.is_absolute() else base / p).resolve()
    for parent in (base, *_queueing_repo(base)):
        try:
            return p.relative_to(parent).as_posix()
        except ValueError:
            continue
    return str(p)


def _queueing_repo(base: Path) -> list[Path]:
    """``[<repo>]`` when ``base`` is a DVC experiment workspace ``<repo>/.dvc/tmp/exps/...``, else ``[]``."""
    parts = base.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return [Path(*parts[:i])]
    return []


def short_commit(root: str | Path | None = None) -> str:
    """The first 7 hex chars of HEAD (``unknown`` outside git), with ``+`` when tracked files are modified."""
    commit, dirty = git_state(root)
    return commit if commit == "unknown" else commit[:7] + ("+" if dirty else "")


def git_state(root: str | Path | None = None) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the repository at ``root``; ``("unknown", None)`` outside git.

    ``dirty`` counts modified tracked files only: DVC outputs and scratch files are untracked by design.
    """
    cwd = str(root or project_root())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(status.strip())


def _manifest_sha256(model_dir: Path) -> str | None:
    # The claimed digest only: verifying would hash multi-GB weights at every stage start. The stages that
    # consume a model verify it (trainer.export.verify_manifest) and log_logged_model records the verified one.
    try:
        return str(json.loads((model_dir / "manifest.json").read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lineage_tags(
    params: Params,
    *,
    stage: str,
    root: str | Path | None = None,
    include_method: bool = True,
) -> dict[str, str]:
    """The ``oprd.*`` tags of one stage run derived from the config and the model directories.

    ``oprd.stage``; ``oprd.git.commit|dirty``; ``oprd.teacher.path|revision|sha256`` and the same for
    ``oprd.student_base``; with ``include_method``: ``oprd.method`` and ``oprd.loss.*`` (representation loss
    layers/positions/k/normalize/aggregation/coef, OPD top_k/mu/weight). Missing values are left out, never
    written as empty strings (an empty tag reads like a recorded value).
    """
    base = Path(root).resolve() if root is not None else project_root()
    commit, dirty = git_state(base)
    tags: dict[str, str] = {"oprd.stage": stage, "oprd.git.commit": commit}
    if dirty is not None:
        tags["oprd.git.dirty"] = str(dirty).lower()
    if (
        params.watch.trigger_id is not None
    ):  # a cycle `oprd-ci watch` queued: trigger -> run (docs/triggers.md)
        tags["oprd.trigger_id"] = str(params.watch.trigger_id)
        tags["oprd.trigger_kind"] = params.watch.trigger_kind or "unknown"
    for role, src in (("teacher", params.models.teacher), ("student_base", params.models.student)):
        path = Path(src.path) if Path(src.path).is_absolute() else base / src.path
        tags[f"oprd.{role}.path"] = repo_relative(path, base)
        if src.revision:
            tags[f"oprd.{role}.revision"] = src.revision
        if (sha := _manifest_sha256(path)) is not None:
            tags[f"oprd.{role}.sha256"] = sha
    if include_method:
        d = params.distill
        layers = d.rep.layers if isinstance(d.rep.layers, str) else json.dumps(d.rep.layers)
        tags.update(
            {
                "oprd.method": d.method,
                "oprd.loss.rep.layers": layers,
                "oprd.loss.rep.positions": d.rep.positions,
                "oprd.loss.rep.k": str(d.rep.k),
                "oprd.loss.rep.normalize": str(d.rep.normalize).lower(),
                "oprd.loss.rep.aggregation": d.rep.aggregation,
                "oprd.loss.rep.coef": str(d.rep.coef),
                "oprd.loss.opd.top_k": str(d.opd.top_k),
                "oprd.loss.opd.weight": d.opd.weight,
            }
        )
    return tags


# ------------------------------------------------------------------------------------------ the stage run
class StageRun:
    """One MLflow run per execution of one DVC stage.

    ``with StageRun("distill", params, upstream=["artifacts/rollout/rollout.mlflow.json"]) as run:`` ...

    On enter: probes the store (:func:`check_tracking_reachable`, raises :class:`TrackingUnreachable` in a few
    seconds), sets the process-wide MLflow tracking URI (MLflow internals resolve LoggedModels through it),
    creates/gets the experiment, starts a run named ``<stage> [<method>] <short commit>`` (or ``run_name``) and logs the flattened
    config, :func:`lineage_tags`, ``oprd.dvc.stage``, ``oprd.upstream.<stage>`` = upstream run id for every
    upstream ref, ``oprd.dataset.<name>.sha256`` for ``datasets`` and ``extra_tags``. It is also the active
    fluent run, so ``mlflow.log_*`` inside the block land in it.

    On exit: logs ``wall_seconds``, ``device_hours = wall_seconds * num_devices / 3600`` and
    ``cost_usd = device_hours * price_per_device_hour`` (``num_devices`` may be changed inside the block,
    e.g. after torchrun reported its world size; on CPU count processes). Ends the run FINISHED, or FAILED with
    ``oprd.failure_reason`` = ``<ExceptionType>: <message>`` when the block raised; the exception propagates.

    Attributes available inside the block: ``run_id``, ``experiment_id``, ``tracking_uri``, ``client``,
    ``upstream`` (``{stage: RunRef}``), ``num_devices``.
    """

    def __init__(
        self,
        stage: str,
        params: Params,
        *,
        upstream: Iterable[RunRef | str | Path] = (),
        dvc_stage: str | None = None,
        num_devices: int = 1,
        device_kind: str = "cpu",
        datasets: Mapping[str, str] | None = None,
        extra_tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
        root: str | Path | None = None,
        include_method: bool | None = None,
    ) -> None:
        self.stage = stage
        self.params = params
        self.cfg = params.tracking
        self.root = Path(root).resolve() if root is not None else project_root()
        self.tracking_uri = resolve_tracking_uri(self.cfg, root=self.root)
        self.dvc_stage = dvc_stage or stage
        self.num_devices = num_devices
        self.device_kind = device_kind
        self.datasets = dict(datasets or {})
        self.extra_tags = dict(extra_tags or {})
        # Named for what the run is: "distill oprd 1a2b3c4" (stage, method where it matters, short commit).
        if run_name is None:
            method = f" {params.distill.method}" if stage in ("distill", "rollout") else ""
            run_name = f"{stage}{method} {short_commit(self.root)}"
        self.run_name = run_name
        # The bootstrap stage builds the models: a distillation method means nothing there.
        self.include_method = stage != "bootstrap" if include_method is None else include_method
        self.upstream: dict[str, RunRef] = {}
        for ref in upstream:
            r = ref if isinstance(ref, RunRef) else read_run_ref(ref)
            self.upstream[r.stage] = r
        self.client: MlflowClient = MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
        )
        self.experiment_id = ""
        self.run_id = ""
        self._uris: AbstractContextManager[None] = nullcontext()
        self._t0 = 0.0

    def __enter__(self) -> StageRun:
        configure_http_client(self.cfg)
        check_tracking_reachable(self.tracking_uri, timeout_s=self.cfg.timeout_s)
        # Process-wide URIs are needed inside the block (LoggedModel resolution) and restored on exit.
        self._uris = process_uris(self.tracking_uri)
        self._uris.__enter__()
        self.experiment_id = ensure_experiment(
            self.client, self.cfg.experiment, default_artifact_location(self.tracking_uri, self.cfg)
        )
        tags = lineage_tags(self.params, stage=self.stage, root=self.root, include_method=self.include_method)
        tags["oprd.dvc.stage"] = self.dvc_stage
        tags["oprd.device_kind"] = self.device_kind
        tags.update({f"oprd.upstream.{s}": r.run_id for s, r in self.upstream.items()})
        tags.update({f"oprd.dataset.{n}.sha256": d for n, d in self.datasets.items()})
        tags.update(self.extra_tags)
        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._t0 = time.perf_counter()
        try:
            params = flatten_params(self.params.model_dump(mode="json"))
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
            # Active fluent run: mlflow.log_input/log_metric and friends inside the block land here.
            mlflow.start_run(run_id=self.run_id)
        except BaseException as exc:
            self._finish(exc)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._finish(exc)
        finally:
            self._uris.__exit__(None, None, None)

    @property
    def wall_seconds(self) -> float:
        """Seconds since the run started (the stage body's wall time so far)."""
        return time.perf_counter() - self._t0

    def cost_metrics(self) -> dict[str, float]:
        """``wall_seconds``, ``device_hours`` and ``cost_usd`` as of now (what ``__exit__`` logs)."""
        wall = self.wall_seconds
        device_hours = wall * self.num_devices / 3600.0
        return {
            "wall_seconds": wall,
            "device_hours": device_hours,
            "cost_usd": device_hours * self.cfg.price_per_device_hour,
            "num_devices": float(self.num_devices),
        }

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        """Log scalar metrics to the run in one request (one timestamp, one step)."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags to the run (one request)."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metric_logger(
        self, *, flush_every: int = 1, spill_path: str | Path | None = None
    ) -> MlflowMetricLogger:
        """An outage-tolerant per-step logger for this run with ``tracking.retries``/``backoff_s``.

        In a torchrun child (another process) build it directly:
        ``MlflowMetricLogger(run_id, tracking_uri=..., retries=..., backoff_s=...)`` with the values this run
        passes down (e.g. in the environment).
        """
        return MlflowMetricLogger(
            self.run_id,
            client=self.client,
            retries=self.cfg.retries,
            backoff_s=self.cfg.backoff_s,
            flush_every=flush_every,
            spill_path=spill_path,
        )

    def write_ref(
        self, path: str | Path, outputs: Mapping[str, str], *, models: Mapping[str, str] | None = None
    ) -> Path:
        """:func:`pipelines.lineage.write_run_ref` for this run (stage and tracking URI filled in)."""
        return write_run_ref(
            path,
            self.run_id,
            outputs,
            stage=self.stage,
            models=models,
            tracking_uri=self.tracking_uri,
            experiment_id=self.experiment_id,
        )

    def _finish(self, exc: BaseException | None) -> None:
        status = "FAILED" if exc is not None else "FINISHED"
        try:
            now = int(time.time() * 1000)
            tags = [RunTag("oprd.status", status.lower())]
            if exc is not None:
                tags.append(RunTag("oprd.failure_reason", f"{type(exc).__name__}: {exc}"[:_MAX_TAG_VALUE]))
            metrics = [Metric(k, v, now, 0) for k, v in self.cost_metrics().items()]
            self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                # Closing the fluent run too, so a later StageRun in the same process starts cleanly.
                mlflow.end_run(status=status)
            else:
                self.client.set_terminated(self.run_id, status)
        except Exception as track_exc:
            if exc is None:
                raise
            # The stage already failed; its own exception is the one the user must see.
            log.error("could not mark MLflow run %s as FAILED: %s", self.run_id, track_exc)
