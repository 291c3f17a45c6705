"""Retirement by policy (server.retirement): the rules retire what they select, never an alias target or an alias's
rollback target; one audit row and one event per retired version. SQLite, and PostgreSQL for the age rule."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import ADMIN, CI, POLICY, READ, auth, evidence, server_env
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server.app import create_app
from server.orm import utcnow

NAME = "student"


def _policy(c, retirement: dict | None, name: str = NAME) -> None:
    spec = {**POLICY, "retirement": retirement} if retirement is not None else POLICY
    r = c.put(
        f"/v1/models/{name}/policy", json={"spec": spec, "reason": "retirement rules"}, headers=auth(ADMIN)
    )
    assert r.status_code == 200, r.text


def _gate(c, ev, **params):
    r = c.post("/v1/gate", json=ev, headers=auth(CI), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _four_versions(c, make_artifact, teacher: str = "teacher@abc123") -> None:
    """v1, v2, v3 promoted in turn (champion v3, rollback target v2); v4 registered and decided, not promoted."""
    for i, acc in enumerate([0.5, 0.52, 0.55, 0.56], start=1):
        ev = evidence(NAME, make_artifact(f"v{i}"), acc, seed=1)
        ev["lineage"]["teacher"] = teacher
        _gate(c, ev, **({"promote": "false"} if i == 4 else {}))


def _apply(c, dry_run: bool = False, token: str = ADMIN):
    return c.post(f"/v1/models/{NAME}/retire-by-policy", json={"dry_run": dry_run}, headers=auth(token))


def _statuses(c) -> dict[int, str]:
    return {
        v["version"]: v["status"] for v in c.get(f"/v1/models/{NAME}/versions", headers=auth(READ)).json()
    }


def test_promotions_behind_retires_old_keeps_champion_and_rollback_target(settings_factory, make_artifact):
    with TestClient(create_app(settings_factory(mlflow_enabled=False))) as c:
        _policy(c, {"max_promotions_behind": 0})
        _four_versions(c, make_artifact)
        assert _apply(c, token=CI).status_code == 403
        plan = _apply(c, dry_run=True).json()
        assert plan["retired"] == {"1": "2 promotions behind (max 0)"} and plan["dry_run"]
        assert _statuses(c) == {1: "READY", 2: "READY", 3: "READY", 4: "READY"}  # dry run changed nothing
        out = _apply(c).json()
        assert list(out["retired"]) == ["1"]
        assert out["protected"] == {"2": f"{NAME}@champion would roll back to it"}
        assert _statuses(c) == {1: "RETIRED", 2: "READY", 3: "READY", 4: "READY"}
        history = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()
        retires = [e for e in history if e["action"] == "retire"]
        assert [(e["to_version"], e["actor"]) for e in retires] == [(1, "bootstrap-admin")]
        assert retires[0]["reason"] == "retirement policy v1: 2 promotions behind (max 0)"
        events = c.get("/v1/events", headers=auth(READ), params={"model": NAME}).json()
        assert [e["event"]["data"]["version"] for e in events if e["event"]["type"].endswith(".retire")] == [
            1
        ]
        assert _apply(c).json()["retired"] == {}  # applying again retires nothing more


def test_age_never_retires_champion_or_rollback_target(settings_factory, make_artifact):
    """Every version is older than the limit: all but the champion and its rollback target are retired."""
    with TestClient(create_app(settings_factory(mlflow_enabled=False))) as c:
        _policy(c, {"max_age_days": 5})
        _four_versions(c, make_artifact)
        assert _apply(c).json()["retired"] == {}  # all are new
        with c.app.state.db.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE model_versions SET created_at = :t"), {"t": utcnow() - timedelta(days=10)}
            )
        out = _apply(c).json()
        assert sorted(out["retired"]) == ["1", "4"] and "10.0 days old (max 5)" in out["retired"]["1"]
        assert set(out["protected"]) == {"2", "3"}
        assert out["protected"]["3"] == f"{NAME}@champion points to it"
        assert _statuses(c) == {1: "RETIRED", 2: "READY", 3: "READY", 4: "RETIRED"}
        s = c.get(f"/v1/models/{NAME}/status?mlflow=false", headers=auth(READ)).json()
        assert s["champion"]["version"] == 3


def test_teacher_retired_retires_students_but_not_the_champion(settings_factory, make_artifact):
    """The teacher is itself a registered version; once it is retired, its non-champion students are retired."""
    with TestClient(create_app(settings_factory(mlflow_enabled=False))) as c:
        _policy(c, {"teacher_retired": True})
        _policy(c, None, name="teacher")
        t = _gate(c, evidence("teacher", make_artifact("the-teacher"), 0.9, seed=1))
        sha = c.get("/v1/models/teacher/versions/1", headers=auth(READ)).json()["manifest_sha256"]
        assert t["promoted"]["version"] == 1
        _four_versions(c, make_artifact, teacher=f"teacher@{sha}")
        ev = evidence(NAME, make_artifact("v5"), 0.56, seed=1)
        ev["lineage"]["teacher"] = "teacher@" + "0" * 64  # another teacher: unaffected
        _gate(c, ev, promote="false")
        assert _apply(c).json()["retired"] == {}  # the teacher is still READY
        r = c.post("/v1/models/teacher/versions/1/retire", json={"reason": "recalled"}, headers=auth(ADMIN))
        assert r.status_code == 200
        out = _apply(c).json()
        assert sorted(out["retired"]) == ["1", "4"] and set(out["protected"]) == {"2", "3"}
        assert out["retired"]["4"] == f"teacher teacher@{sha} is retired"
        assert _statuses(c) == {1: "RETIRED", 2: "READY", 3: "READY", 4: "RETIRED", 5: "READY"}


def test_no_retirement_block_retires_nothing_and_keeps_the_policy_digest(settings_factory, make_artifact):
    from server.policy import PolicySpec, policy_digest

    assert policy_digest(PolicySpec.model_validate(POLICY)) == policy_digest(
        PolicySpec.model_validate({**POLICY, "retirement": None})
    )
    with TestClient(create_app(settings_factory(mlflow_enabled=False))) as c:
        _policy(c, None)
        _four_versions(c, make_artifact)
        out = _apply(c).json()
        assert out["retired"] == {} and out["policy_version"] == 1
        r = c.put(
            f"/v1/models/{NAME}/policy",
            json={"spec": {**POLICY, "retirement": {"max_promotions_behind": -1}}, "reason": "bad"},
            headers=auth(ADMIN),
        )
        assert r.status_code == 422 and "max_promotions_behind" in r.text


def test_age_rule_on_postgres(pg_fresh_url, settings_factory, make_artifact):
    with TestClient(create_app(settings_factory(pg_fresh_url, mlflow_enabled=False))) as c:
        _policy(c, {"max_age_days": 1, "max_promotions_behind": 5})
        _four_versions(c, make_artifact)
        with c.app.state.db.engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE model_versions SET created_at = :t WHERE version = 1"),
                {"t": utcnow() - timedelta(days=2)},
            )
        out = _apply(c).json()
        assert list(out["retired"]) == ["1"] and _statuses(c)[1] == "RETIRED"


def test_cli_retire_apply_policy(tmp_path, make_artifact, monkeypatch):
    import typer

    from oprd_ci.registry_cli import register

    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    cli = typer.Typer()
    register(cli)
    run = CliRunner().invoke
    from server.settings import ServerSettings

    with TestClient(create_app(ServerSettings())) as c:
        _policy(c, {"max_promotions_behind": 0})
        _four_versions(c, make_artifact)
    r = run(cli, ["retire", "--reason", "policy", "--apply-policy", "--dry-run"])
    assert r.exit_code == 0 and f"would retire {NAME} v1" in r.output, r.output
    r = run(cli, ["retire", "--reason", "policy", "--apply-policy", NAME, "--json"])
    assert r.exit_code == 0, r.output
    assert list(json.loads(r.stdout)[0]["retired"]) == ["1"]
    r = run(cli, ["retire", "--reason", "x", "--apply-policy", NAME, "2"])
    assert r.exit_code == 2


@pytest.mark.parametrize("bad", [{"max_age_days": 0}, {"unknown": 1}])
def test_bad_retirement_block_refused(bad):
    from pydantic import ValidationError

    from server.policy import PolicySpec

    with pytest.raises(ValidationError):
        PolicySpec.model_validate({**POLICY, "retirement": bad})


def test_watcher_applies_the_policy_in_the_background(settings_factory, make_artifact):
    """``OPRD_RETIREMENT_INTERVAL_S``: the server retires by policy on its own, as ``system:retirement``."""
    import time

    with TestClient(create_app(settings_factory(mlflow_enabled=False, retirement_interval_s=0.1))) as c:
        _policy(c, {"max_promotions_behind": 0})
        _four_versions(c, make_artifact)
        deadline = time.monotonic() + 30
        while _statuses(c)[1] != "RETIRED":
            assert time.monotonic() < deadline, "the watcher never retired v1"
            time.sleep(0.1)
        time.sleep(0.3)  # further passes retire nothing more
        assert _statuses(c) == {1: "RETIRED", 2: "READY", 3: "READY", 4: "READY"}
        history = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()
        assert [(e["to_version"], e["actor"]) for e in history if e["action"] == "retire"] == [
            (1, "system:retirement")
        ]
