"""R4 (partial): MLflow unreachable -> the move commits, stays visibly pending, and is applied later; drift
made directly in MLflow is repaired from the database."""

from __future__ import annotations

from conftest import ADMIN, CI, POLICY, READ, auth, evidence
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from server.app import create_app


def test_mlflow_down_then_reconciled_and_drift_repaired(settings_factory, make_artifact, tmp_path):
    # an MLflow store that cannot be opened stands in for an unreachable server (same code path: apply raises)
    (tmp_path / "a-file").write_text("not a directory")
    dead = f"sqlite:///{tmp_path}/a-file/mlflow.db"
    with TestClient(
        create_app(settings_factory(mlflow_tracking_uri=dead, sync_wait_s=0)), raise_server_exceptions=False
    ) as c:
        c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        r = c.post("/v1/gate", json=evidence("student", make_artifact("v1"), 0.5), headers=auth(CI))
        assert r.status_code == 200 and r.json()["promoted"]["version"] == 1
        rec = c.post("/v1/reconcile", headers=auth(ADMIN)).json()
        assert rec["pending"] == 2 and rec["errors"] and "create_version" in rec["errors"][0]
        st = c.get("/v1/models/student/status", headers=auth(READ)).json()
        assert st["pending_mlflow_writes"] == 2 and st["mlflow_aliases"] is None and st["last_mlflow_error"]
        assert c.get("/health").json()["pending_mlflow_writes"] == 2

    settings = settings_factory()  # same database, MLflow back
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        rec = c.post("/v1/reconcile", headers=auth(ADMIN)).json()
        assert rec["pending"] == 0 and rec["errors"] == []
        mlc = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        assert int(mlc.get_model_version_by_alias("student", "champion").version) == 1
        # someone moves the alias behind the service's back: the next reconcile restores the DB's choice
        r = c.post(
            "/v1/gate",
            json=evidence("student", make_artifact("v2"), 0.5),
            headers=auth(CI),
            params={"promote": "false"},
        )
        assert r.status_code == 200
        c.post("/v1/reconcile", headers=auth(ADMIN))
        mlc.set_registered_model_alias("student", "champion", "2")
        rec = c.post("/v1/reconcile", headers=auth(ADMIN)).json()
        assert rec["drift_fixed"] == ["student@champion: MLflow 2 -> 1"]
        assert int(mlc.get_model_version_by_alias("student", "champion").version) == 1
