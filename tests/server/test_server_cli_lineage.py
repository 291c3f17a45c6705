"""``oprd-ci lineage`` links, ``oprd-ci reconcile`` and the "MLflow pending" line, on real MLflow stores (a lean
``mlflow server`` on a free, non-default port, or a sqlite store) and the in-process registry."""

from __future__ import annotations

import json
import time

import httpx
from conftest import ADMIN, LiveServer, evidence, free_port, server_env
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from typer.testing import CliRunner

from oprd_ci.registry_cli import EXIT_CONFLICT, EXIT_SERVER
from pipelines.lineage import LINK_LABELS, lineage_links

POLICY_FILE = "tests/server/policies/permissive.yaml"  # synthetic ~0.5 students must PROMOTE


def _run(cli, args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _env(monkeypatch, tmp_path, **extra) -> dict[str, str]:
    env = server_env(tmp_path, **extra)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("OPRD_REGISTRY_URL", "OPRD_MLFLOW_UI_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    if not env["OPRD_MLFLOW_TRACKING_URI"].startswith("http"):
        # as the gate stage does: MLflow resolves a version's models:/ source through the process-wide store
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["OPRD_MLFLOW_TRACKING_URI"])
    return env


def _pipeline_in(uri: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """What the stages leave in MLflow, for real: one run per stage and the three LoggedModels (READY)."""
    c = MlflowClient(uri)
    exp = c.create_experiment("oprd-ci")
    runs = {s: c.create_run(exp, run_name=s).info.run_id for s in ("rollout", "distill", "evaluate", "gate")}
    models = {}
    for role in ("teacher", "student_base", "student"):
        src = runs["distill"] if role == "student" else runs["rollout"]
        models[role] = c.create_logged_model(exp, name=role, source_run_id=src).model_id
        c.finalize_logged_model(models[role], LoggedModelStatus.READY)
    return exp, runs, models


def _gate(cli, tmp_path, make_artifact, runs, models) -> None:
    ev = evidence("student", make_artifact("v1"), 0.5, n=60, seed=1)
    ev |= {"mlflow_run_id": runs["distill"], "logged_model_id": models["student"],
           "mlflow_source": f"models:/{models['student']}"}  # fmt: skip
    ev["lineage"] |= {"mlflow_run_ids": runs, "logged_model_ids": models,
                      "dataset_digests": {"train_prompts": "12" * 32, "eval_embedded": "34" * 32}}  # fmt: skip
    (tmp_path / "ev.json").write_text(json.dumps(ev))
    r = _run(cli, ["gate", "--evidence", str(tmp_path / "ev.json"), "--policy", POLICY_FILE])
    assert r.exit_code == 0 and "PROMOTE" in r.output, r.output


def test_lineage_links_point_at_the_tracking_server_on_its_own_port(
    cli, mlflow_server, tmp_path, make_artifact, monkeypatch
):
    """No UI address configured, an HTTP tracking server on a free port: every link goes to that server, each
    names a run, LoggedModel or version that server has, and the targets are the version page's link plan."""
    assert not mlflow_server.endswith(":5000")
    _env(monkeypatch, tmp_path, OPRD_MLFLOW_TRACKING_URI=mlflow_server)
    exp, runs, models = _pipeline_in(mlflow_server)
    _gate(cli, tmp_path, make_artifact, runs, models)
    r = _run(cli, ["lineage", "student@champion", "--json"])
    assert r.exit_code == 0, r.output
    links = {row["what"]: row["url"] for row in json.loads(r.output)["links"]}
    expected = lineage_links(mlflow_server, model_name="student", version=1, experiment_id=exp,
                             run_ids=runs, model_ids=models)  # fmt: skip
    for concept, url in expected.items():
        what = "student v1" if concept == "version" else LINK_LABELS[concept]
        assert links[what] == url, concept
    assert links["training data"] == links["distill run"]  # one target: the run that trained on the data
    api = f"{mlflow_server}/api/2.0/mlflow"
    for what, url in links.items():
        assert url.startswith(f"{mlflow_server}/#/"), (what, url)
        fragment = url.split("#", 1)[1]
        if "/runs/" in fragment:
            rid = fragment.split("/runs/")[1].split("/")[0]
            assert httpx.get(f"{api}/runs/get", params={"run_id": rid}).status_code == 200, what
        elif "/models/m-" in fragment:
            mid = fragment.split("/models/")[1]
            assert httpx.get(f"{api}/logged-models/{mid}").status_code == 200, what
        else:
            v = httpx.get(f"{api}/model-versions/get", params={"name": "student", "version": "1"})
            assert v.status_code == 200 and fragment == "/models/student/versions/1", what
    monkeypatch.setenv(
        "OPRD_MLFLOW_UI_URL", "https://mlflow.example.org:8443/"
    )  # an explicit UI address wins
    urls = [row["url"] for row in json.loads(_run(cli, ["lineage", "student", "--json"]).output)["links"]]
    assert urls and all(u.startswith("https://mlflow.example.org:8443/#/") for u in urls if u)


def test_lineage_without_a_ui_address_gives_relative_links_and_says_how_to_set_one(
    cli, tmp_path, make_artifact, monkeypatch
):
    env = _env(monkeypatch, tmp_path)  # a sqlite tracking store: no UI address exists to link to
    _, runs, models = _pipeline_in(env["OPRD_MLFLOW_TRACKING_URI"])
    _gate(cli, tmp_path, make_artifact, runs, models)
    r = _run(cli, ["lineage", "student@champion", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    urls = [row["url"] for row in out["links"] if row["url"]]
    assert len(urls) >= 9 and all(u.startswith("#/") for u in urls), urls  # never a guessed host or port
    r = CliRunner().invoke(cli, ["lineage", "student@champion"])
    assert "OPRD_MLFLOW_UI_URL" in r.output


def test_status_recommends_reconcile_which_repairs_drift_without_a_server(
    cli, tmp_path, make_artifact, monkeypatch
):
    env = _env(monkeypatch, tmp_path)
    _, runs, models = _pipeline_in(env["OPRD_MLFLOW_TRACKING_URI"])
    _gate(cli, tmp_path, make_artifact, runs, models)
    ml = MlflowClient(env["OPRD_MLFLOW_TRACKING_URI"])
    ml.delete_registered_model_alias("student", "champion")  # someone edits the alias in the MLflow UI
    r = _run(cli, ["status", "student"])
    assert r.exit_code == EXIT_CONFLICT and "Run `oprd-ci reconcile student`" in r.output, r.output
    assert "promote again" not in r.output
    r = _run(cli, ["reconcile", "student"])
    assert r.exit_code == 0, r.output
    assert "repaired drift: student@champion: MLflow None -> 1" in r.output
    assert str(ml.get_model_version_by_alias("student", "champion").version) == "1"
    assert _run(cli, ["status", "student"]).exit_code == 0
    r = _run(cli, ["reconcile", "student", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["drift_fixed"] == []  # idempotent: nothing left to do


def test_reconcile_is_bounded_and_loses_nothing_when_mlflow_is_unreachable(
    cli, tmp_path, make_artifact, monkeypatch
):
    _env(monkeypatch, tmp_path, OPRD_MLFLOW_ENABLED="false")
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(evidence("student", make_artifact("v1"), 0.5, n=60, seed=1)))
    assert _run(cli, ["gate", "--evidence", str(f), "--policy", POLICY_FILE]).exit_code == 0
    # MLflow comes back on an address where nothing listens: the client would retry for minutes
    monkeypatch.setenv("OPRD_MLFLOW_ENABLED", "true")
    monkeypatch.setenv("OPRD_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    r = _run(cli, ["reconcile", "--timeout", "3"])
    assert r.exit_code == EXIT_SERVER, r.output
    assert "nothing is lost" in r.output and "2 pending write(s)" in r.output


def test_promote_says_mlflow_pending_only_when_it_still_is(cli, tmp_path, make_artifact, monkeypatch):
    """The server answers before its writes reach MLflow (sync wait 0 s here): the command's own bounded wait
    applies them, so nothing is reported, and MLflow agrees when the command returns."""
    env = _env(monkeypatch, tmp_path, OPRD_SYNC_WAIT_S="0")
    ml = MlflowClient(env["OPRD_MLFLOW_TRACKING_URI"])
    for i, acc in ((1, 0.5), (2, 0.55)):
        f = tmp_path / f"ev{i}.json"
        f.write_text(json.dumps(evidence("student", make_artifact(f"v{i}"), acc, n=60, seed=1)))
        r = _run(cli, ["gate", "--evidence", str(f), "--policy", POLICY_FILE])
        assert r.exit_code == 0 and "MLflow pending" not in r.output, r.output
    r = _run(cli, ["rollback", "student", "--reason", "canary"])
    assert r.exit_code == 0 and "-> v1" in r.output and "MLflow pending" not in r.output, r.output
    assert str(ml.get_model_version_by_alias("student", "champion").version) == "1"


def test_over_http_mlflow_pending_is_said_only_when_it_still_is(cli, tmp_path, make_artifact):
    """Against `oprd-ci serve` (uvicorn) answering before its writes reach MLflow (sync wait 0 s): the CLI waits
    (bounded) for the server's reconciler and stays silent when MLflow has caught up."""
    env = server_env(tmp_path, OPRD_SYNC_WAIT_S="0")
    ml = MlflowClient(env["OPRD_MLFLOW_TRACKING_URI"])
    ml.search_experiments()  # create the store's tables now: their one-time migration is not what is measured
    srv = LiveServer(env, tmp_path / "server.log")
    try:
        base = ["--url", srv.url, "--token", ADMIN]
        r = _run(cli, ["policy", "set", "student", "--file", POLICY_FILE, "--reason", "initial", *base])
        assert r.exit_code == 0, r.output
        for i, acc in ((1, 0.5), (2, 0.55)):
            f = tmp_path / f"ev{i}.json"
            f.write_text(json.dumps(evidence("student", make_artifact(f"v{i}"), acc, n=60, seed=1)))
            r = _run(cli, ["gate", "--evidence", str(f), *base])
            assert r.exit_code == 0 and "PROMOTE" in r.output, r.output
            if (
                i == 1
            ):  # the server's first MLflow write opens (migrates) its stores: seconds on a busy machine
                for _ in range(600):
                    if (
                        httpx.get(
                            f"{srv.url}/v1/models/student/status",
                            params={"mlflow": "false"},
                            headers={"Authorization": f"Bearer {ADMIN}"},
                        ).json()["pending_mlflow_writes"]
                        == 0
                    ):
                        break  # fmt: skip
                    time.sleep(0.2)
            else:
                assert "MLflow pending" not in r.output, r.output
        r = _run(cli, ["rollback", "student", "--reason", "canary", *base])
        assert r.exit_code == 0 and "-> v1" in r.output and "MLflow pending" not in r.output, r.output
        assert str(ml.get_model_version_by_alias("student", "champion").version) == "1"
    finally:
        srv.stop()
