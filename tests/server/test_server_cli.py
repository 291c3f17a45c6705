"""The registry CLI (``oprd_ci.registry_cli.register``) in-process and against a live server, with its exit codes."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import ADMIN, CI, READ, LiveServer, evidence, server_env
from typer.testing import CliRunner

from oprd_ci.registry_cli import (
    EXIT_AUTH,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_SERVER,
    EXIT_USAGE,
    parse_target,
)

POLICY_FILE = "tests/server/policies/permissive.yaml"  # synthetic ~0.5 students must PROMOTE


def _run(cli, args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


def test_cli_in_process_gate_status_history_rollback(cli, tmp_path, make_artifact, monkeypatch):
    """No URL: the CLI runs the app in-process on $OPRD_DATABASE_URL as the local admin."""
    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    monkeypatch.setenv("USER", "alice")
    for i, acc in enumerate([0.5, 0.55], start=1):
        f = tmp_path / f"ev{i}.json"
        f.write_text(json.dumps(evidence("student", make_artifact(f"v{i}"), acc, n=60, seed=1)))
        out = tmp_path / "metrics" / "gate.json"
        gate = [
            "gate",
            "--evidence",
            str(f),
            "--policy",
            POLICY_FILE,
            "--out",
            str(out),
            "--reason",
            f"nightly {i}",
        ]
        r = _run(cli, gate)
        assert r.exit_code == 0, r.output
        assert "PROMOTE" in r.output and json.loads(out.read_text())["promoted"]["version"] == i
    r = _run(cli, ["status", "student", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["champion"]["version"] == 2
    r = _run(cli, ["rollback", "student", "--reason", "canary regression"])
    assert r.exit_code == 0 and "-> v1" in r.output
    hist = json.loads(_run(cli, ["history", "student", "--json"]).output)
    assert hist[-2]["reason"].endswith("PROMOTE (nightly 2)")  # the gate's move carries the caller's reason
    assert (
        hist[-1]["action"] == "rollback"
        and hist[-1]["actor"] == "local:alice"
        and hist[-1]["reason"] == "canary regression"
    )
    r = _run(cli, ["policy", "show", "student", "--json"])
    assert json.loads(r.output)["spec"]["suites"]["embedded"]["min_problems"] == 50
    r = _run(cli, ["lineage", "student/2", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["version"]["version"] == 2
    assert _run(cli, ["status", "nobody"]).exit_code == EXIT_NOT_FOUND


def test_cli_exit_codes_against_live_server(cli, tmp_path, make_artifact):
    srv = LiveServer(server_env(tmp_path, OPRD_MLFLOW_ENABLED="false"), tmp_path / "server.log")
    try:
        base = ["--url", srv.url]
        f = tmp_path / "ev.json"
        f.write_text(json.dumps(evidence("student", make_artifact("v1"), 0.5)))
        # the ci token cannot install a policy: the gate fails closed with an auth error
        r = _run(cli, ["gate", "--evidence", str(f), "--policy", POLICY_FILE, "--token", CI, *base])
        assert r.exit_code == EXIT_AUTH, r.output
        r = _run(
            cli,
            [
                "policy",
                "set",
                "student",
                "--file",
                POLICY_FILE,
                "--reason",
                "initial",
                "--token",
                ADMIN,
                *base,
            ],
        )
        assert r.exit_code == 0, r.output
        r = _run(cli, ["gate", "--evidence", str(f), "--token", CI, "--json", *base])
        # JSON on stdout; notes such as "MLflow pending" go to stderr
        assert r.exit_code == 0 and json.loads(r.stdout)["decision"]["verdict"] == "PROMOTE"
        assert _run(cli, ["status", "student", *base]).exit_code == EXIT_AUTH  # no token
        assert _run(cli, ["status", "student", "--token", "wrong", *base]).exit_code == EXIT_AUTH
        r = _run(
            cli,
            ["promote", "student", "1", "--reason", "stale", "--expect-revision", "7", "--token", CI, *base],
        )
        assert r.exit_code == EXIT_CONFLICT and "expected_revision" in r.output
        r = _run(cli, ["retire", "student", "1", "--reason", "nope", "--token", READ, *base])
        assert r.exit_code == EXIT_AUTH
        r = _run(cli, ["promote", "student", "1", "--reason", "x", "--token", CI, *base])
        assert r.exit_code == EXIT_USAGE and "reason" in r.output  # 422: reason too short
        assert CI not in r.output
        # a 422 reads as one line naming the field and the value, not FastAPI's JSON list
        r = _run(cli, ["status", "bad name!", "--token", READ, *base])
        assert r.exit_code == EXIT_USAGE
        assert r.output.strip().splitlines() == [
            "error: name 'bad name!': String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'"
        ]
    finally:
        srv.stop()
    r = _run(cli, ["status", "student", "--url", srv.url, "--token", READ])
    assert r.exit_code == EXIT_SERVER and "unreachable" in r.output


def test_parse_target():
    assert parse_target("student") == ("student", {})
    assert parse_target("student@champion") == ("student", {"alias": "champion"})
    assert parse_target("student/3") == ("student", {"version": 3})
    with pytest.raises(typer.BadParameter):
        parse_target("student/latest")


def test_cli_status_flags_mlflow_disagreement_and_names_known_models(
    cli, tmp_path, make_artifact, monkeypatch
):
    """`status` exits 4 with a readable line when MLflow's alias drifted; unknown names get a did-you-mean."""
    from mlflow import MlflowClient

    env = server_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(evidence("student", make_artifact("v1"), 0.5, n=60, seed=1)))
    assert _run(cli, ["gate", "--evidence", str(f), "--policy", POLICY_FILE]).exit_code == 0
    from server.app import create_app

    create_app(run_reconciler=False).state.reconciler.run_once()  # MLflow has caught up with the registry
    assert _run(cli, ["status", "student"]).exit_code == 0  # MLflow agrees
    MlflowClient(env["OPRD_MLFLOW_TRACKING_URI"]).delete_registered_model_alias("student", "champion")
    r = _run(cli, ["status", "student"])
    assert r.exit_code == EXIT_CONFLICT
    assert "MLflow's aliases disagree with the registry" in r.output
    assert "student@champion: registry says v1, MLflow says no such alias" in r.output
    r = _run(cli, ["status", "studnet"])
    assert r.exit_code == EXIT_NOT_FOUND and "HTTP" not in r.output
    assert "did you mean 'student'?" in r.output and "known models: student" in r.output
    r = _run(cli, ["lineage", "student/9"])
    assert r.exit_code == EXIT_NOT_FOUND and "known versions of student: v1" in r.output


def test_serve_refuses_several_workers_on_sqlite(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("OPRD_DATABASE_URL", f"sqlite:///{tmp_path}/r.db")
    r = _run(cli, ["serve", "--workers", "2"])
    assert r.exit_code == EXIT_USAGE and "PostgreSQL" in r.output


def test_status_shows_parked_and_pending_mlflow_writes(cli, tmp_path, make_artifact, monkeypatch):
    """In-process CLI with MLflow mirroring off: the gate's writes stay pending, and status says so."""
    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    f = tmp_path / "ev.json"
    f.write_text(json.dumps(evidence("student", make_artifact("v1"), 0.5)))
    r = _run(cli, ["gate", "--evidence", str(f), "--policy", POLICY_FILE, "--out", str(tmp_path / "g.json")])
    assert r.exit_code == 0, r.output
    assert "MLflow pending" in r.output
    r = _run(cli, ["status", "student"])
    assert r.exit_code == 0 and "2 pending writes, 0 parked" in r.output, r.output
