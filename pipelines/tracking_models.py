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

import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException

from pipelines.lineage import LineageEdge, LineageNode, render_lineage
from pipelines.mlflow_globals import process_uris
from trainer.export import MANIFEST_NAME, verify_manifest

__all__ = [
    "REGISTRY_MANAGED_TAG",
    "RegistryManagedError",
    "log_dataset",
    "log_lineage",
    "log_logged_model",
    "log_model_inputs",
    "log_model_outputs",
    "register_student",
    "registry_fields",
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
    file). The source is the absolute file path.
    """
    p = Path(path).resolve()
    frame = df if df is not None else _read_table(p)
    with warnings.catch_warnings():
        # MLflow registers two equivalent local-file source classes and warns that the path is ambiguous,
        # and warns about integer columns in the inferred schema; neither applies to a recorded input.
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(
            frame, source=str(p), name=name, digest=digest[:DATASET_DIGEST_CHARS], targets=targets
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
    on any mismatch). Tags: ``oprd.role``, ``oprd.manifest_sha256``, ``oprd.path`` (absolute),
    ``oprd.weights`` (``copied`` or ``reference``) plus ``tags``. ``weights="copy"`` uploads the whole
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
            return ready[0].model_id
    copy = weights == "copy" or (weights == "auto" and _dir_bytes(d) <= copy_max_mb * 1024 * 1024)
    all_tags = {
        "oprd.role": role,
        SHA_TAG: sha,
        "oprd.path": str(d),
        "oprd.weights": "copied" if copy else "reference",
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    model = c.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=all_tags, model_type="transformers-dir"
    )
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
    """Render the lineage PNG (``pipelines.lineage.render_lineage``) and log it as a run artifact;
    returns the artifact path inside the run (``lineage/lineage.png``)."""
    with tempfile.TemporaryDirectory(prefix="oprd-lineage-") as tmp:
        png = render_lineage(Path(tmp) / "lineage.png", nodes, edges, title=title)
        _client(client).log_artifact(run_id, str(png), artifact_path)
    return f"{artifact_path}/lineage.png"
