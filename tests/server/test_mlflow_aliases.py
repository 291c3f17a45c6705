"""The mlflow-free alias reader (``server.mlflow_aliases``) answers exactly as ``MlflowClient`` does, on a real
SQLite store and a real tracking server, and ``oprd-ci status`` uses it: the command compares the registry with
MLflow without importing ``mlflow`` (or torch, transformers, alembic, FastAPI), which is what keeps it under 2 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ADMIN, CI, POLICY, auth, evidence, server_env
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from server.app import create_app
from server.mlflow_aliases import read_aliases

REPO = Path(__file__).resolve().parents[2]


def _client_aliases(client: MlflowClient, name: str) -> dict[str, int]:
    return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}


def _exercise(uri: str, source: str, run_id: str | None = None) -> None:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert read_aliases(uri, "m") == {}  # no such model: {} like the client's RESOURCE_DOES_NOT_EXIST
    client.create_registered_model("m")
    assert read_aliases(uri, "m") == _client_aliases(client, "m") == {}
    for _ in range(3):
        client.create_model_version("m", source, run_id=run_id)
    client.create_registered_model("other")
    client.create_model_version("other", source, run_id=run_id)
    client.set_registered_model_alias("other", "champion", "1")  # another model's alias must not leak in
    client.set_registered_model_alias("m", "champion", "3")
    client.set_registered_model_alias("m", "challenger", "1")
    assert read_aliases(uri, "m") == _client_aliases(client, "m") == {"champion": 3, "challenger": 1}
    client.set_registered_model_alias("m", "champion", "2")
    client.delete_registered_model_alias("m", "challenger")
    assert read_aliases(uri, "m") == _client_aliases(client, "m") == {"champion": 2}


def test_sql_store_reader_agrees_with_client(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert read_aliases(uri, "m") is None  # no store yet: the client creates it, not this reader
    src = tmp_path / "model"
    src.mkdir()
    _exercise(uri, str(src))


def test_rest_reader_agrees_with_client(mlflow_server, tmp_path):
    import mlflow

    from pipelines.mlflow_globals import process_uris

    with process_uris(mlflow_server), mlflow.start_run() as run:
        mlflow.log_text("x", "model/x.txt")
    _exercise(mlflow_server, f"runs:/{run.info.run_id}/model", run.info.run_id)


def test_reader_declines_what_it_does_not_model(tmp_path, monkeypatch):
    assert read_aliases(f"file://{tmp_path}/mlruns", "m") is None
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert read_aliases("https://mlflow.example.invalid", "m") is None


_PROBE = """
import json, sys
from typer.main import get_command
from oprd_ci.cli import app
code = get_command(app)(["status", "student", "--json"], standalone_mode=False) or 0  # Exit(n) -> n
heavy = sorted(m for m in ("mlflow", "torch", "transformers", "alembic", "fastapi") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _status(env: dict[str, str], cwd: Path) -> tuple[dict, dict]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    probe = json.loads(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout) if out.stdout.strip() else {}, probe


def test_status_compares_with_mlflow_without_importing_it(tmp_path, make_artifact):
    env_vars = server_env(tmp_path)
    from server.settings import ServerSettings

    settings = ServerSettings(**{k.removeprefix("OPRD_").lower(): v for k, v in env_vars.items()})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        r = c.post("/v1/gate", json=evidence("student", make_artifact("v1"), 0.5), headers=auth(CI))
        assert r.status_code == 200 and r.json()["promoted"]["version"] == 1
        r = c.post("/v1/gate", json=evidence("student", make_artifact("v2"), 0.5), headers=auth(CI),
                   params={"promote": "false"})  # fmt: skip
        assert r.status_code == 200
        assert c.post("/v1/reconcile", headers=auth(ADMIN)).json()["pending"] == 0

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPRD_", "MLFLOW_"))}
    env.update(env_vars, PYTHONPATH=str(REPO))
    env.pop("OPRD_ADMIN_TOKEN")  # in-process as the local admin, no token needed
    status, probe = _status(env, tmp_path)
    assert probe == {"code": 0, "heavy": []}
    assert status["mlflow_aliases"] == {"champion": 1}

    # drift made in MLflow behind the registry's back: reported (exit 4), still without importing mlflow
    MlflowClient(settings.mlflow_tracking_uri).set_registered_model_alias("student", "champion", "2")
    status, probe = _status(env, tmp_path)
    assert probe == {"code": 4, "heavy": []}
    assert status["mlflow_aliases"] == {"champion": 2}


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = (
        "import sys\nfrom typer.main import get_command\nfrom oprd_ci.cli import app\n"
        f"try:\n    get_command(app)({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('mlflow','torch','transformers','alembic','fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr
