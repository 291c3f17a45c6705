"""The registry against a lean ``mlflow server`` over HTTP: versions and aliases are mirrored, and a local
path source (which MLflow's server refuses) is rejected up front instead of poisoning the outbox."""

from __future__ import annotations

import mlflow
from conftest import ADMIN, CI, POLICY, READ, auth, evidence
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from pipelines.mlflow_globals import process_uris
from server.app import create_app


def test_gate_mirrors_to_mlflow_server_over_http(mlflow_server, settings_factory, make_artifact, stack):
    art = make_artifact("v1")
    # process-wide for this test only: later tests must not talk to this store
    stack.enter_context(process_uris(mlflow_server))
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(art), "model")
    settings = settings_factory(mlflow_tracking_uri=mlflow_server)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        r = c.post("/v1/gate", json=evidence("student", art, 0.5), headers=auth(CI))
        assert r.status_code == 422 and "mlflow_source" in r.json()["detail"]
        ev = {
            **evidence("student", art, 0.5),
            "mlflow_source": f"runs:/{run.info.run_id}/model",
            "mlflow_run_id": run.info.run_id,
        }
        r = c.post("/v1/gate", json=ev, headers=auth(CI))
        assert r.status_code == 200 and r.json()["promoted"]["version"] == 1
        assert c.post("/v1/reconcile", headers=auth(ADMIN)).json()["pending"] == 0
        assert c.get("/v1/models/student/status", headers=auth(READ)).json()["mlflow_aliases"] == {
            "champion": 1
        }
    mv = MlflowClient(mlflow_server).get_model_version_by_alias("student", "champion")
    assert mv.version == "1" and mv.run_id == run.info.run_id and mv.tags["oprd.manifest_sha256"]
