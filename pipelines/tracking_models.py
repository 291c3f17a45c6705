"""Datasets, models and registered versions in MLflow, with content digests as their identity.

* :func:`log_dataset` records a dataset file as a run input with a context (``training``, ``evaluation``,
  ...) and the sha256 the pipeline computed, not MLflow's own digest of a sample.
* :func:`log_logged_model` records a model directory as an MLflow 3 LoggedModel; large directories are logged
  by reference (``config.json`` + ``manifest.json`` only), and one LoggedModel exists per (role, manifest
  sha256) in an experiment, so the rollout and distill stages both pointing at the teacher reuse one.
* :func:`log_model_inputs` / :func:`log_model_outputs` link LoggedModels to the run that consumed / produced
  them (the run page's "Logged models" panels).
* :func:`register_student` creates the registered model version **only when no registry service manages the
  model**. The registry service (``server/``) is the one writer of versions and aliases of models it manages
  and mirrors them into MLflow itself (``server/mlflow_mirror.py``); a second, pipeline-created version would
  make its mirror diverge. The gate stage therefore registers through the service, giving it
  :func:`registry_fields`; ``register_student`` is for MLflow-only setups and returns the existing version
  when one with the same manifest sha256 is already there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelInput,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
)
from mlflow.exceptions import MlflowException

from pipelines.lineage import LineageEdge, LineageNode, render_lineage
from pipelines.mlflow_globals import process_uris
from pipelines.tracking import repo_relative, short_commit
from trainer.export import MANIFEST_NAME, verify_manifest

__all__ = [
    "REGISTRY_MANAGED_TAG",
    "RegistryManagedError",
    "ensure_source_models",
    "find_logged_model",
    "log_dataset",
    "log_lineage",
    "log_logged_model",
    "log_model_inputs",
    "log_model_metrics",
    "log_model_outputs",
    "register_student",
    "registry_fields",
    "set_version_record",
]

REGISTRY_MANAGED_TAG = "oprd.managed_by"
"""Registered-model tag the registry service sets on models it manages (``server/mlflow_mirror.py``)."""
SHA_TAG = "oprd.manifest_sha256"
"""Tag holding a directory's verified manifest sha256, on LoggedModels and model versions (as the server)."""
DATASET_DIGEST_CHARS = 32
"""Hex chars of the sha256 used as MLflow dataset digest (MLflow's limit is 36)."""
_METADATA_FILES = ("config.json", "generation_config.json", MANIFEST_NAME)


class RegistryManagedError(RuntimeError):
    """The registered model is managed by the registry service; register through it, not MLflow."""


def _client(client: MlflowClient | None) -> MlflowClient:
    return client or MlflowClient()


# ------------------------------------------------------------------------------------------ datasets
def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    if suffix == ".json":
        return pd.read_json(path)
    if suffix == ".csv":
        return pd.read_csv(path)
    raise ValueError(f"{path}: unsupported dataset format {suffix!r} (parquet, jsonl, json, csv)")


def log_dataset(
    run_id: str,
    path: str | Path,
    name: str,
    context: str,
    digest: str,
    *,
    df: pd.DataFrame | None = None,
    targets: str | None = None,
    tags: Mapping[str, str] | None = None,
    client: MlflowClient | None = None,
) -> None:
    """Record the dataset file ``path`` as an input of ``run_id`` with ``context`` and our ``digest``.

    ``digest`` is the sha256 the pipeline computed over the file (MLflow would otherwise hash a sample of the
    frame). MLflow caps dataset digests at 36 characters, so the dataset digest is its first
    :data:`DATASET_DIGEST_CHARS` hex chars and the full value is the input tag ``oprd.sha256``. ``df`` skips
    reading the file (pass it when the caller already holds the frame, or a schema-bearing head of a huge
    file). The source is the file path relative to the project root (absolute outside it).
    """
    p = Path(path).resolve()
    frame = df if df is not None else _read_table(p)
    source = repo_relative(p)
    with warnings.catch_warnings():
        # MLflow registers two equivalent local-file source classes and warns that the path is ambiguous,
        # and warns about integer columns in the inferred schema; neither applies to a recorded input.
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(
            frame, source=source, name=name, digest=digest[:DATASET_DIGEST_CHARS], targets=targets
        )
        entity = ds._to_mlflow_entity()  # the schema is inferred here
    input_tags = [InputTag("mlflow.data.context", context), InputTag("oprd.sha256", digest)]
    input_tags += [InputTag(k, str(v)) for k, v in (tags or {}).items()]
    _client(client).log_inputs(run_id, datasets=[DatasetInput(entity, input_tags)])


# ------------------------------------------------------------------------------------------ models
def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def log_logged_model(
    name: str,
    model_dir: str | Path,
    *,
    role: str,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    weights: Literal["auto", "copy", "reference"] = "auto",
    copy_max_mb: float = 512.0,
    experiment_id: str | None = None,
    reuse: bool = True,
    client: MlflowClient | None = None,
) -> str:
    """Record ``model_dir`` as a READY LoggedModel and return its model id.

    The directory's manifest is verified first (``trainer.export.verify_manifest``; raises ``ManifestError``
    on any mismatch). Tags: ``oprd.role``, ``oprd.manifest_sha256``, ``oprd.path`` (repo-relative),
    ``oprd.weights`` (``copied`` or ``reference``) plus ``tags``. Params (what the LoggedModel page shows in its
    Parameters table; the UI lists tags nowhere): ``path`` and ``sha256``, the same two values. ``weights="copy"`` uploads the whole
    directory, ``"reference"`` only ``config.json``/``generation_config.json``/``manifest.json`` (the weights
    stay at ``oprd.path``, identified by the sha256), ``"auto"`` copies up to ``copy_max_mb``.

    With ``reuse`` an existing READY LoggedModel of the experiment with the same role and sha256 is returned
    instead of creating another (tags from ``tags`` are added to it). ``run_id`` becomes the source run of a
    new model; ``experiment_id`` defaults to the run's experiment.

    Raises:
        trainer.export.ManifestError: the directory does not match its manifest.
        ValueError: neither ``run_id`` nor ``experiment_id`` is given.
    """
    c = _client(client)
    d = Path(model_dir).resolve()
    sha = verify_manifest(d)
    if experiment_id is None:
        if run_id is None:
            raise ValueError("log_logged_model: pass run_id or experiment_id")
        experiment_id = c.get_run(run_id).info.experiment_id
    if reuse:
        found = c.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"tags.`{SHA_TAG}` = '{sha}' AND tags.`oprd.role` = '{role}'",
            max_results=10,
        )
        ready = [m for m in found if m.status == LoggedModelStatus.READY]
        if ready:
            if tags:
                c.set_logged_model_tags(ready[0].model_id, {k: str(v) for k, v in tags.items()})
            _ensure_identity_params(c, ready[0])
            return ready[0].model_id
    copy = weights == "copy" or (weights == "auto" and _dir_bytes(d) <= copy_max_mb * 1024 * 1024)
    all_tags = {
        "oprd.role": role,
        SHA_TAG: sha,
        "oprd.path": repo_relative(d),
        "oprd.weights": "copied" if copy else "reference",
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    model = c.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=all_tags, model_type="transformers-dir",
        params=_identity_params(all_tags),
    )  # fmt: skip
    try:
        if copy:
            c.log_model_artifacts(model.model_id, str(d))
        else:
            with tempfile.TemporaryDirectory(prefix="oprd-model-ref-") as tmp:
                for f in _METADATA_FILES:
                    if (d / f).is_file():
                        shutil.copy2(d / f, Path(tmp) / f)
                c.log_model_artifacts(model.model_id, tmp)
    except BaseException:
        # A half-uploaded model must not be picked up by reuse or by a registration.
        c.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    c.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _identity_params(tags: Mapping[str, str]) -> dict[str, str]:
    """``path`` and ``sha256`` as LoggedModel params: the UI's model page shows params, not tags."""
    return {"path": tags["oprd.path"], "sha256": tags[SHA_TAG]}


def _ensure_identity_params(c: MlflowClient, model: Any) -> None:
    """Give a LoggedModel logged before params were written (same role and sha256, reused) its ``path`` and
    ``sha256`` params; params are write-once, so only missing ones are logged."""
    if "oprd.path" not in model.tags or SHA_TAG not in model.tags:
        return
    missing = {k: v for k, v in _identity_params(model.tags).items() if k not in (model.params or {})}
    if missing:
        c.log_model_params(model.model_id, missing)


def find_logged_model(client: MlflowClient, experiment_id: str, role: str, sha256: str) -> str | None:
    """The id of a READY LoggedModel of ``experiment_id`` with this role and manifest sha256, or None."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{SHA_TAG}` = '{sha256}' AND tags.`oprd.role` = '{role}'",
        max_results=10,
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else None


def ensure_source_models(
    models: Mapping[str, str | Path],
    *,
    experiment_id: str,
    embedded: bool,
    bootstrap_record: str | Path | None = None,
    copy_max_mb: float = 0.0,
    client: MlflowClient | None = None,
) -> dict[str, str]:
    """LoggedModel ids of the pipeline's input models (``{"teacher": dir, "student_base": dir}``).

    A model already logged with the same role and manifest sha256 is reused. Missing ones are logged with the
    run that produced them as their source run: the embedded pair gets a ``bootstrap <commit>`` run (with the
    bootstrap record's numbers as metrics: steps, val accuracies, wall time), external checkpoints a
    ``register external models <commit>`` run (tags name each directory and its sha256). Either run lists the
    models as its outputs, so the LoggedModel page's "source run" is that run, never a consumer like rollout.
    """
    c = _client(client)
    shas = {role: verify_manifest(Path(d)) for role, d in models.items()}
    ids = {role: find_logged_model(c, experiment_id, role, sha) for role, sha in shas.items()}
    for mid in ids.values():
        if mid is not None:
            _ensure_identity_params(c, c.get_logged_model(mid))
    missing = [role for role, mid in ids.items() if mid is None]
    if not missing:
        return {role: str(mid) for role, mid in ids.items()}
    stage = "bootstrap" if embedded else "register_external"
    name = f"{'bootstrap' if embedded else 'register external models'} {short_commit()}"
    tags = {"oprd.stage": stage, "mlflow.note.content": (
        "Produced the embedded teacher and student base (`pipelines/bootstrap.py`)." if embedded
        else "Records externally trained checkpoints as LoggedModels (their source run)."
    )}  # fmt: skip
    for role in missing:
        tags[f"oprd.{role}.path"] = repo_relative(models[role])
        tags[f"oprd.{role}.sha256"] = shas[role]
    run = c.create_run(experiment_id, run_name=name, tags=tags)
    status = "FAILED"
    try:
        if bootstrap_record is not None and Path(bootstrap_record).is_file():
            rec = json.loads(Path(bootstrap_record).read_text())
            now = int(time.time() * 1000)
            values = {"steps_run": rec.get("steps_run"), "wall_time_s": rec.get("wall_time_s")}
            for role in ("teacher", "student_base"):
                for k in ("step", "val_acc"):
                    values[f"{role}/{k}"] = (rec.get(role) or {}).get(k)
            metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if isinstance(v, (int, float))]
            c.log_batch(run.info.run_id, metrics=metrics)
            c.log_artifact(run.info.run_id, str(bootstrap_record))
        for role in missing:
            ids[role] = log_logged_model(
                role, models[role], role=role, run_id=run.info.run_id, copy_max_mb=copy_max_mb,
                reuse=False, client=c,
            )  # fmt: skip
        log_model_outputs(run.info.run_id, [ids[r] for r in missing], client=c)  # type: ignore[misc]
        status = "FINISHED"
    finally:
        c.set_terminated(run.info.run_id, status)
    return {role: str(mid) for role, mid in ids.items()}


def log_model_metrics(
    run_id: str,
    model_id: str,
    metrics: Mapping[str, float],
    *,
    dataset_name: str | None = None,
    dataset_digest: str | None = None,
    client: MlflowClient | None = None,
) -> None:
    """Log ``metrics`` against LoggedModel ``model_id`` (and the dataset they were measured on) in ``run_id``:
    the LoggedModel page lists them and the experiment's Models view compares models on the same keys."""
    now = int(time.time() * 1000)
    digest = dataset_digest[:DATASET_DIGEST_CHARS] if dataset_digest else None
    rows = [
        Metric(k, float(v), now, 0, model_id=model_id, dataset_name=dataset_name, dataset_digest=digest)
        for k, v in metrics.items()
    ]
    if rows:
        _client(client).log_batch(run_id, metrics=rows)


def log_model_inputs(run_id: str, model_ids: Sequence[str], *, client: MlflowClient | None = None) -> None:
    """Link LoggedModels the run consumed (the teacher and student base of a distill run)."""
    if model_ids:
        _client(client).log_inputs(run_id, models=[LoggedModelInput(m) for m in model_ids])


def log_model_outputs(
    run_id: str, model_ids: Sequence[str], *, step: int = 0, client: MlflowClient | None = None
) -> None:
    """Link LoggedModels the run produced (the distilled student of a distill run)."""
    if model_ids:
        _client(client).log_outputs(run_id, models=[LoggedModelOutput(m, step) for m in model_ids])


# ------------------------------------------------------------------------------------------ registration
def registry_fields(
    model_id: str, run_id: str, model_dir: str | Path, *, teacher: str | None = None
) -> dict[str, Any]:
    """The MLflow fields of a registration through the registry service (``RegisterVersionIn`` /
    ``EvidenceIn``): the service then creates the MLflow version with source ``models:/<model_id>``."""
    fields: dict[str, Any] = {
        "artifact_path": str(Path(model_dir).resolve()),
        "mlflow_run_id": run_id,
        "logged_model_id": model_id,
        "mlflow_source": f"models:/{model_id}",
    }
    if teacher is not None:
        fields["teacher"] = teacher
    return fields


def _versions_with_sha(c: MlflowClient, name: str, sha: str) -> list[Any]:
    return [mv for mv in c.search_model_versions(f"name = '{name}'") if mv.tags.get(SHA_TAG) == sha]


def register_student(
    name: str,
    *,
    model_id: str,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    client: MlflowClient | None = None,
) -> int:
    """Register LoggedModel ``model_id`` as a version of ``name`` (MLflow-only setups); return the version.

    Idempotent by content: a version of ``name`` whose ``oprd.manifest_sha256`` equals the model's is returned
    (and gets ``tags`` added) instead of creating a second one. Version tags: ``oprd.manifest_sha256``,
    ``oprd.logged_model_id`` (the keys the registry service writes) plus ``tags`` (method, teacher, ...).

    Raises:
        RegistryManagedError: ``name`` is managed by the registry service (registered-model tag
            ``oprd.managed_by``) and has no version with this sha256: register through the service
            (:func:`registry_fields`), which mirrors the version into MLflow.
        ValueError: the LoggedModel has no ``oprd.manifest_sha256`` tag (not logged by log_logged_model).
    """
    c = _client(client)
    model = c.get_logged_model(model_id)
    sha = model.tags.get(SHA_TAG)
    if not sha:
        raise ValueError(f"LoggedModel {model_id} has no {SHA_TAG} tag; log it with log_logged_model")
    version_tags = {
        SHA_TAG: sha,
        "oprd.logged_model_id": model_id,
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    try:
        registered = c.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        registered = None
    if registered is not None:
        existing = _versions_with_sha(c, name, sha)
        if existing:
            mv = min(existing, key=lambda v: int(v.version))
            for k, v in version_tags.items():
                if mv.tags.get(k) != v:
                    c.set_model_version_tag(name, mv.version, k, v)
            return int(mv.version)
        if registered.tags.get(REGISTRY_MANAGED_TAG):
            raise RegistryManagedError(
                f"model {name!r} is managed by the registry service ({registered.tags[REGISTRY_MANAGED_TAG]}); "
                "register the student through it (oprd-ci gate / POST /v1/models/{name}/versions with "
                "registry_fields(...)) so MLflow gets exactly one version"
            )
    # register_model resolves models:/<id> through the process-wide tracking URI: point it here for the call
    # only, so no later caller in this process silently talks to this store.
    with process_uris(c.tracking_uri, c._registry_uri):
        mv = mlflow.register_model(f"models:/{model_id}", name, tags=version_tags)
    return int(mv.version)


def set_version_record(
    name: str,
    version: int,
    *,
    description: str,
    tags: Mapping[str, str],
    model_id: str | None = None,
    client: MlflowClient | None = None,
) -> bool:
    """Write the gate's record onto registered version ``name/version``: the markdown ``description`` (the
    model-version page renders it, links included) and ``tags``; with ``model_id`` also make sure the
    LoggedModel lists the version (``mlflow.modelVersions``, what its page shows under "Model versions").

    Returns False (and changes nothing) when MLflow does not have the version yet (the registry's mirror is
    behind; ``oprd-ci status`` reports pending writes).
    """
    c = _client(client)
    try:
        c.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    c.update_model_version(name, str(version), description=description)
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v))
    if model_id:
        model = c.get_logged_model(model_id)
        entry = {"name": name, "version": int(version)}  # as mlflow.register_model writes it
        listed = json.loads(model.tags.get("mlflow.modelVersions") or "[]")
        if not any(str(e.get("name")) == name and str(e.get("version")) == str(version) for e in listed):
            c.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps([*listed, entry])})
    return True


# ------------------------------------------------------------------------------------------ the picture
def log_lineage(
    run_id: str,
    nodes: Sequence[LineageNode],
    edges: Sequence[LineageEdge],
    *,
    title: str = "",
    artifact_path: str = "lineage",
    client: MlflowClient | None = None,
) -> str:
    """Log the lineage picture (:func:`pipelines.lineage.render_lineage`) as the run artifact
    ``<artifact_path>/lineage.png`` and return that path. MLflow shows images inline; the linked lineage view is
    the model-version page (an HTML artifact would be shown in a sandboxed frame whose links cannot navigate)."""
    c = _client(client)
    with tempfile.TemporaryDirectory(prefix="oprd-lineage-") as tmp:
        render_lineage(Path(tmp) / "lineage.png", nodes, edges, title=title)
        c.log_artifacts(run_id, tmp, artifact_path)
    return f"{artifact_path}/lineage.png"
