"""pipelines.tracking / tracking_models / tracking_metrics / lineage against a real MLflow store.

Unit tests use a tmp sqlite store (real MLflow, no server). The outage tests run a real lean ``mlflow server``
subprocess that is stopped and restarted on the same sqlite file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from PIL import Image

from pipelines.lineage import (
    LineageEdge,
    LineageNode,
    RunRefError,
    lineage_links,
    read_run_ref,
    render_lineage,
    verdict_kind,
    write_run_ref,
)
from pipelines.tracking import (
    MAX_PARAM_VALUE,
    StageRun,
    TrackingUnreachable,
    check_tracking_reachable,
    flatten_params,
    resolve_tracking_uri,
)
from pipelines.tracking_metrics import MetricsNotLogged, MlflowMetricLogger
from pipelines.tracking_models import (
    RegistryManagedError,
    ensure_source_models,
    log_dataset,
    log_lineage,
    log_logged_model,
    log_model_inputs,
    log_model_metrics,
    register_student,
    registry_fields,
    set_version_record,
)
from pipelines.tracking_server import LeanMlflowServer, free_port
from trainer.config import Params, TrackingConfig, load_params
from trainer.export import ManifestError, verify_manifest, write_manifest
from trainer.metrics import MetricLogger


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store per module: alembic initialisation costs seconds, runs are cheap."""
    d = tmp_path_factory.mktemp("mlstore")
    return f"sqlite:///{d / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root (dvc.yaml marker) with teacher/student-base directories carrying manifests."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    for name, payload in (("teacher", b"T" * 300), ("student-base", b"S" * 300)):
        d = tmp_path / "artifacts" / "models" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"name": name}))
        (d / "model.safetensors").write_bytes(payload)
        write_manifest(d)
    return tmp_path


def params_for(store: str, experiment: str, **over: object) -> Params:
    return load_params(None, {"tracking.uri": store, "tracking.experiment": experiment, **over})


def model_dir(root: Path, name: str, payload: bytes) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "generation_config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(payload)
    write_manifest(d)
    return d


# ------------------------------------------------------------------------------------------ uri / probe
def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        resolve_tracking_uri(TrackingConfig(), root=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(TrackingConfig(), root=tmp_path) == "http://127.0.0.1:1"
    assert resolve_tracking_uri(TrackingConfig(uri="http://x:5000"), root=tmp_path) == "http://x:5000"
    # Relative sqlite paths are anchored at the project root, not at the stage's CWD.
    rel = resolve_tracking_uri(TrackingConfig(uri="sqlite:///sub/m.db"), root=tmp_path)
    assert rel == f"sqlite:///{tmp_path.resolve()}/sub/m.db"


def test_unreachable_http_server_fails_fast_with_fix() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(TrackingUnreachable) as ei:
        check_tracking_reachable(uri, timeout_s=2.0)
    assert time.monotonic() - t0 < 5.0
    msg = str(ei.value)
    assert uri in msg and "mlflow server" in msg and "\n" not in msg


def test_stage_run_unreachable_server_raises_before_any_run(project: Path) -> None:
    params = load_params(None, {"tracking.uri": "http://127.0.0.1:9", "tracking.timeout_s": 1.0})
    with (
        pytest.raises(TrackingUnreachable, match=r"127\.0\.0\.1:9"),
        StageRun("distill", params, root=project),
    ):
        pytest.fail("the body must not run when tracking is down")


def test_sqlite_in_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(TrackingUnreachable, match="missing or not writable"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/nope/mlflow.db")


# ------------------------------------------------------------------------------------------ params
def test_flatten_params_dotted_json_and_truncated() -> None:
    flat = flatten_params({"distill": {"method": "oprd", "rep": {"layers": [1, 2], "k": 8}}, "x": None})
    assert flat == {
        "distill.method": "oprd",
        "distill.rep.layers": "[1, 2]",
        "distill.rep.k": "8",
        "x": "null",
    }
    long = flatten_params({"p": "a" * 10_000})["p"]
    assert len(long) == MAX_PARAM_VALUE and long.endswith("<truncated 10000 chars>")


# ------------------------------------------------------------------------------------------ StageRun
def test_stage_run_logs_params_tags_cost_and_upstream(store: str, project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project / "artifacts")  # stages may start anywhere below the root
    params = params_for(
        store,
        "exp-stage",
        **{
            "distill.method": "combined",
            "distill.rep.layers": [2, 4],
            "tracking.price_per_device_hour": 3600.0,
        },
    )
    up = write_run_ref(project / "artifacts", "a" * 32, {"rollout": "ab" * 32}, stage="rollout")
    with StageRun(
        "distill", params, upstream=[up], num_devices=2, datasets={"prompts": "cd" * 32}, root=project
    ) as run:
        mlflow.log_metric("inside", 1.0)  # the fluent API lands in the stage run
        time.sleep(0.05)
    r = MlflowClient(store).get_run(run.run_id)
    assert (
        r.info.status == "FINISHED" and r.info.run_name == "distill combined unknown"
    )  # stage method commit
    p, t, m = r.data.params, r.data.tags, r.data.metrics
    assert p["distill.method"] == "combined" and p["distill.rep.layers"] == "[2, 4]"
    assert p["tracking.experiment"] == "exp-stage"
    teacher_sha = json.loads((project / "artifacts/models/teacher/manifest.json").read_text())["sha256"]
    assert t["oprd.stage"] == "distill" and t["oprd.dvc.stage"] == "distill"
    assert t["oprd.teacher.sha256"] == teacher_sha
    assert t["oprd.teacher.path"] == "artifacts/models/teacher"  # repo-relative: the same on every machine
    assert "oprd.student_base.sha256" in t
    assert t["oprd.method"] == "combined" and t["oprd.loss.rep.layers"] == "[2, 4]"
    assert t["oprd.loss.rep.coef"] == "1.0" and t["oprd.loss.rep.normalize"] == "false"
    assert t["oprd.upstream.rollout"] == "a" * 32
    assert t["oprd.dataset.prompts.sha256"] == "cd" * 32
    assert t["oprd.git.commit"] == "unknown"  # tmp project is no git repo
    assert m["inside"] == 1.0 and m["num_devices"] == 2.0
    assert m["wall_seconds"] >= 0.05
    assert m["device_hours"] == pytest.approx(m["wall_seconds"] * 2 / 3600)
    assert m["cost_usd"] == pytest.approx(m["device_hours"] * 3600.0)
    exp = MlflowClient(store).get_experiment(r.info.experiment_id)
    # Absolute and next to the db, whatever the CWD was.
    assert exp.artifact_location.endswith(str(Path(store[len("sqlite:///") :]).parent / "mlartifacts"))
    assert mlflow.active_run() is None


def test_stage_run_failure_marks_failed_and_reraises(store: str, project: Path) -> None:
    params = params_for(store, "exp-fail")
    with pytest.raises(ZeroDivisionError), StageRun("bootstrap", params, root=project) as run:
        1 / 0  # noqa: B018
    r = MlflowClient(store).get_run(run.run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags["oprd.failure_reason"].startswith("ZeroDivisionError: division by zero")
    assert "oprd.method" not in r.data.tags  # bootstrap builds models; no distillation method
    assert "cost_usd" in r.data.metrics
    assert mlflow.active_run() is None


def test_git_state_in_a_repo(store: str, project: Path) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "dvc.yaml"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=project, check=True, env=env)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True
    ).stdout.strip()
    (project / "dvc.yaml").write_text("stages: {a: 1}\n")
    with StageRun("rollout", params_for(store, "exp-git"), root=project) as run:
        pass
    tags = MlflowClient(store).get_run(run.run_id).data.tags
    assert tags["oprd.git.commit"] == head and tags["oprd.git.dirty"] == "true"


# ------------------------------------------------------------------------------------------ run refs
def test_run_ref_roundtrip_and_errors(tmp_path: Path) -> None:
    path = write_run_ref(tmp_path, "r1", {"student": "ff" * 32}, stage="distill", models={"student": "m-1"})
    assert path == tmp_path / "distill.mlflow.json"
    ref = read_run_ref(path)
    assert (ref.stage, ref.run_id, ref.outputs, ref.models) == (
        "distill",
        "r1",
        {"student": "ff" * 32},
        {"student": "m-1"},
    )
    assert read_run_ref(tmp_path, stage="distill") == ref
    with pytest.raises(RunRefError, match="run the upstream stage"):
        read_run_ref(tmp_path / "rollout.mlflow.json")
    (tmp_path / "bad.mlflow.json").write_text('{"stage": "bad"}')
    with pytest.raises(RunRefError, match="malformed"):
        read_run_ref(tmp_path / "bad.mlflow.json")


def test_skipped_upstream_keeps_its_link(store: str, project: Path) -> None:
    """The downstream run links to the run named in the ref file, not to the latest run of that stage."""
    params = params_for(store, "exp-skip")
    with StageRun("rollout", params, root=project) as first:
        first.write_ref(project / "artifacts", {"rollout": "11" * 32})
    with StageRun("rollout", params, root=project):  # a later rollout run whose outputs were not kept
        pass
    ref = project / "artifacts" / "rollout.mlflow.json"
    with StageRun("distill", params, upstream=[ref], root=project) as down:
        pass
    tags = MlflowClient(store).get_run(down.run_id).data.tags
    assert tags["oprd.upstream.rollout"] == first.run_id


# ------------------------------------------------------------------------------------------ datasets / models
def test_log_dataset_with_context_and_explicit_digest(store: str, project: Path) -> None:
    data = project / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"id": str(i), "prompt": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(5))
    )
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    with StageRun("rollout", params_for(store, "exp-data"), root=project) as run:
        log_dataset(run.run_id, data, "train-prompts", "training", digest, client=run.client)
    inputs = MlflowClient(store).get_run(run.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert ds.name == "train-prompts" and ds.digest == digest[:32]
    assert tags["mlflow.data.context"] == "training" and tags["oprd.sha256"] == digest
    assert json.loads(ds.profile)["num_rows"] == 5 and str(data) in ds.source


def test_logged_model_copy_reference_reuse_and_manifest_check(
    store: str, project: Path, tmp_path: Path
) -> None:
    small = model_dir(tmp_path, "small", b"w" * 2048)
    big = model_dir(tmp_path, "big", b"b" * 3 * 1024 * 1024)
    c = MlflowClient(store)
    with StageRun("bootstrap", params_for(store, "exp-models"), root=project) as run:
        mid = log_logged_model("teacher", small, role="teacher", run_id=run.run_id, client=c)
        again = log_logged_model(
            "teacher", small, role="teacher", run_id=run.run_id, tags={"x": "1"}, client=c
        )
        ref_id = log_logged_model("big", big, role="student", run_id=run.run_id, copy_max_mb=1.0, client=c)
        log_model_inputs(run.run_id, [mid], client=c)
    assert again == mid  # one LoggedModel per (role, sha256)
    m = c.get_logged_model(mid)
    assert m.status == LoggedModelStatus.READY
    assert m.tags["oprd.manifest_sha256"] == json.loads((small / "manifest.json").read_text())["sha256"]
    assert m.tags["oprd.path"] == str(small) and m.tags["oprd.weights"] == "copied" and m.tags["x"] == "1"
    assert m.source_run_id == run.run_id
    copied = {f.path for f in c.list_logged_model_artifacts(mid)}
    assert "model.safetensors" in copied
    referenced = {f.path for f in c.list_logged_model_artifacts(ref_id)}
    assert referenced == {"config.json", "generation_config.json", "manifest.json"}
    assert c.get_logged_model(ref_id).tags["oprd.weights"] == "reference"
    # A tampered directory is refused before anything is logged.
    (small / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(ManifestError):
        log_logged_model("teacher", small, role="teacher", run_id=run.run_id, client=c)
    assert [mi.model_id for mi in c.get_run(run.run_id).inputs.model_inputs] == [mid]


def test_register_student_idempotent_and_respects_registry(store: str, project: Path, tmp_path: Path) -> None:
    c = MlflowClient(store)
    d1, d2 = model_dir(tmp_path, "s1", b"1" * 100), model_dir(tmp_path, "s2", b"2" * 100)
    with StageRun("distill", params_for(store, "exp-reg"), root=project) as run:
        m1 = log_logged_model("student", d1, role="student", run_id=run.run_id, client=c)
        m2 = log_logged_model("student", d2, role="student", run_id=run.run_id, client=c)
    v = register_student("stud", model_id=m1, run_id=run.run_id, tags={"oprd.method": "oprd"}, client=c)
    assert v == 1
    assert register_student("stud", model_id=m1, client=c) == 1  # same bytes: no second version
    assert register_student("stud", model_id=m2, client=c) == 2
    mv = c.get_model_version("stud", "1")
    assert mv.tags["oprd.method"] == "oprd" and mv.tags["oprd.logged_model_id"] == m1
    assert mv.tags["oprd.manifest_sha256"] == c.get_logged_model(m1).tags["oprd.manifest_sha256"]
    assert mv.run_id == run.run_id and mv.source == f"models:/{m1}"
    assert len(c.search_model_versions("name = 'stud'")) == 2
    # A model the registry service manages gets its versions from the service only.
    c.create_registered_model("svc", tags={"oprd.managed_by": "oprd-ci registry"})
    with pytest.raises(RegistryManagedError, match="registry service"):
        register_student("svc", model_id=m1, client=c)
    assert c.search_model_versions("name = 'svc'") == []
    fields = registry_fields(m1, run.run_id, d1, teacher="teacher@1")
    assert fields["mlflow_source"] == f"models:/{m1}" and fields["artifact_path"] == str(d1)


# ------------------------------------------------------------------------------------------ lineage picture
def test_render_and_log_lineage(store: str, project: Path, tmp_path: Path) -> None:
    nodes = [
        LineageNode("teacher", "teacher", details={"sha256": "ab12cd34ef56"}),
        LineageNode("base", "student base", details={"sha256": "0011aa"}),
        LineageNode("student", "distilled student", details={"method": "oprd", "loss": "rep all/all"}),
        LineageNode("eval", "evaluation", kind="evaluation", details={"avg@4": "0.61"}),
        LineageNode("gate", "gate", kind="gate", details={"verdict": "PROMOTE"}),
    ]
    edges = [
        LineageEdge("teacher", "student", "distilled_from"),
        LineageEdge("base", "student", "initialized_from"),
        LineageEdge("student", "eval"),
        LineageEdge("eval", "gate"),
    ]
    png = render_lineage(tmp_path / "l.png", nodes, edges, title="oprd-student v1")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100  # four columns, left to right
    with pytest.raises(ValueError, match="unknown node"):
        render_lineage(tmp_path / "x.png", nodes, [LineageEdge("teacher", "nope")])
    with pytest.raises(ValueError, match="cycle"):
        render_lineage(
            tmp_path / "x.png", nodes[:2], [LineageEdge("teacher", "base"), LineageEdge("base", "teacher")]
        )
    pic = [*nodes[:4], LineageNode("gate", "gate: PROMOTE", verdict_kind("PROMOTE"))]
    with StageRun("gate", params_for(store, "exp-pic"), root=project) as run:
        rel = log_lineage(run.run_id, pic, edges, client=run.client)
    assert rel == "lineage/lineage.png"
    listed = {f.path for f in MlflowClient(store).list_artifacts(run.run_id, "lineage")}
    assert listed == {"lineage/lineage.png"}  # no HTML page: MLflow's sandboxed frame cannot follow its links


def test_one_link_target_per_concept_relative_on_the_version_page_absolute_in_the_cli() -> None:
    runs = {"rollout": "ro", "distill": "di", "evaluate": "ev", "gate": "ga"}
    models = {"teacher": "m-t", "student_base": "m-b", "student": "m-s"}
    kw = dict(model_name="stud", version=4, experiment_id="3", run_ids=runs, model_ids=models)
    page, cli = lineage_links("", **kw), lineage_links("http://ui:5123/", **kw)
    assert list(page) == list(cli) and len(page) == 10
    assert all(cli[k] == "http://ui:5123/" + page[k] for k in page) and all(
        v.startswith("#/") for v in page.values()
    )
    assert page["training_data"] == page["distill"] == "#/experiments/3/runs/di"
    assert (
        page["student_base"] == "#/experiments/3/models/m-b" and page["version"] == "#/models/stud/versions/4"
    )
    assert page["picture"] == "#/experiments/3/runs/ga/artifacts/lineage/lineage.png"
    assert "teacher" not in lineage_links("", **{**kw, "model_ids": {}})  # unknown: left out, not guessed


def test_source_models_eval_metrics_and_version_record(store: str, project: Path) -> None:
    c = MlflowClient(store)
    models = {
        "teacher": project / "artifacts/models/teacher",
        "student_base": project / "artifacts/models/student-base",
    }
    (project / "artifacts/bootstrap.json").write_text(
        json.dumps({"steps_run": 40, "teacher": {"val_acc": 0.9}})
    )
    with StageRun("rollout", params_for(store, "exp-src"), root=project) as run:
        ids = ensure_source_models(
            models, experiment_id=run.experiment_id, embedded=True,
            bootstrap_record=project / "artifacts/bootstrap.json", client=c,
        )  # fmt: skip
        for role, rel in (
            ("teacher", "artifacts/models/teacher"),
            ("student_base", "artifacts/models/student-base"),
        ):
            # as created, not back-filled: the model page shows params (not tags): where it lives, which bytes
            lm = c.get_logged_model(ids[role])
            assert lm.params == {"path": lm.tags["oprd.path"], "sha256": verify_manifest(models[role])}
            assert lm.params["path"].endswith(rel)
        again = ensure_source_models(models, experiment_id=run.experiment_id, embedded=True, client=c)
    assert again == ids  # logged once, reused by every later stage
    src = c.get_run(c.get_logged_model(ids["teacher"]).source_run_id)
    assert src.info.run_id != run.run_id and src.data.tags["oprd.stage"] == "bootstrap"
    assert src.info.run_name.startswith("bootstrap ") and src.data.metrics["teacher/val_acc"] == 0.9
    assert c.get_logged_model(ids["student_base"]).source_run_id == src.info.run_id
    # a model logged before params existed (tags only) gets them when a later stage reuses it
    old = c.create_logged_model(
        run.experiment_id,
        name="teacher",
        tags={
            "oprd.role": "teacher",
            "oprd.path": "artifacts/models/teacher",
            "oprd.manifest_sha256": "ab" * 32,
        },
    )
    c.finalize_logged_model(old.model_id, LoggedModelStatus.READY)
    from pipelines.tracking_models import _ensure_identity_params

    _ensure_identity_params(c, c.get_logged_model(old.model_id))
    assert c.get_logged_model(old.model_id).params == {
        "path": "artifacts/models/teacher",
        "sha256": "ab" * 32,
    }
    log_model_metrics(run.run_id, ids["teacher"], {"embedded/avg_at_k": 0.9}, dataset_name="eval_embedded",
                      dataset_digest="ab" * 32, client=c)  # fmt: skip
    (metric,) = c.get_logged_model(ids["teacher"]).metrics
    assert (metric.key, metric.value, metric.dataset_name) == ("embedded/avg_at_k", 0.9, "eval_embedded")
    assert set_version_record("nope", 1, description="x", tags={}, client=c) is False
    version = register_student("stud-rec", model_id=ids["teacher"], client=c)
    assert set_version_record("stud-rec", version, description="**PROMOTE** [distill](#/x)",
                              tags={"oprd.gate.verdict": "PROMOTE"}, model_id=ids["teacher"], client=c)  # fmt: skip
    mv = c.get_model_version("stud-rec", str(version))
    assert mv.description.startswith("**PROMOTE**") and mv.tags["oprd.gate.verdict"] == "PROMOTE"
    listed = json.loads(c.get_logged_model(ids["teacher"]).tags["mlflow.modelVersions"])
    assert listed.count({"name": "stud-rec", "version": version}) == 1  # not duplicated


# ------------------------------------------------------------------------------------------ metric logger
def test_metric_logger_protocol_and_sqlite_roundtrip(store: str, project: Path) -> None:
    with StageRun("distill", params_for(store, "exp-metrics"), root=project) as run:
        logger = run.metric_logger(flush_every=3)
        assert (logger.retries, logger.backoff_s) == (3, 1.0)  # tracking.retries / backoff_s defaults
        assert isinstance(logger, MetricLogger)
        for step in range(7):
            logger.log_metrics({"loss/total": 1.0 / (step + 1), "rep/cosine/mean": 0.5}, step)
        assert logger.pending == 2  # step 6 waits for close()
        logger.close()
    hist = MlflowClient(store).get_metric_history(run.run_id, "loss/total")
    assert sorted(m.step for m in hist) == list(range(7))


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LeanMlflowServer]:
    # One HTTP attempt per send: the logger's own retries are what is under test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    srv = LeanMlflowServer(tmp_path / "srv")
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_metric_logger_survives_server_restart_and_fails_loudly_when_it_stays_down(
    server: LeanMlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(server.uri)
    exp = client.create_experiment("outage")
    run_id = client.create_run(exp, run_name="distill").info.run_id
    logger = MlflowMetricLogger(run_id, tracking_uri=server.uri, retries=2, backoff_s=0.2)
    for step in range(5):
        logger.log_metrics({"loss/total": float(step), "perf/step_seconds": 0.1}, step)
    assert logger.pending == 0
    server.stop()
    for step in range(5, 10):  # training goes on during the outage; log_metrics never raises
        logger.log_metrics({"loss/total": float(step), "perf/step_seconds": 0.1}, step)
        time.sleep(0.25)
    assert logger.in_outage and logger.pending > 0
    server.start()  # same sqlite file, same port
    for step in range(10, 15):
        logger.log_metrics({"loss/total": float(step), "perf/step_seconds": 0.1}, step)
        time.sleep(0.05)
    logger.close()
    for key in ("loss/total", "perf/step_seconds"):
        hist = MlflowClient(server.uri).get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == list(range(15)), key  # every step, each exactly once

    # A server that never comes back: close() raises naming the URI, and the spill file keeps the metrics.
    logger2 = MlflowMetricLogger(
        run_id, tracking_uri=server.uri, retries=2, backoff_s=0.1, spill_path=tmp_path / "spill.jsonl"
    )
    logger2.log_metrics({"late": 1.0}, 0)
    server.stop()
    logger2.log_metrics({"late": 2.0}, 1)
    logger2.log_metrics({"late": 3.0}, 2)
    t0 = time.monotonic()
    with pytest.raises(MetricsNotLogged) as ei:
        logger2.close()
    assert time.monotonic() - t0 < 30
    assert server.uri in str(ei.value) and "2 metrics" in str(ei.value)
    spilled = [json.loads(x) for x in (tmp_path / "spill.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"], r["value"]) for r in spilled] == [("late", 1, 2.0), ("late", 2, 3.0)]


def test_repo_relative_inside_a_queued_dvc_experiment(tmp_path):
    """A queued experiment runs in ``<repo>/.dvc/tmp/exps/<name>``: its own files are relative to that workspace, a
    file of the repository that queued it (a teacher ``oprd-ci watch`` downloaded to ``teachers/``) relative to that
    repository, anything else stays absolute."""
    from pipelines.tracking import repo_relative

    repo = tmp_path / "repo"
    ws = repo / ".dvc/tmp/exps/tmpab12cd"
    assert repo_relative(ws / "artifacts/models/student", ws) == "artifacts/models/student"
    assert repo_relative(repo / "teachers/oprd-teacher/v2", ws) == "teachers/oprd-teacher/v2"
    assert repo_relative(tmp_path / "elsewhere/teacher", ws) == str(tmp_path / "elsewhere/teacher")
    assert repo_relative(tmp_path / "elsewhere/teacher", repo) == str(tmp_path / "elsewhere/teacher")
