"""End-to-end registry behaviour through the HTTP API (TestClient, real SQLite, real MLflow sqlite store)."""

from __future__ import annotations

import pytest
from conftest import ADMIN, CI, POLICY, READ, auth, evidence
from mlflow import MlflowClient

from pipelines.mlflow_globals import process_uris

NAME = "student"


def _setup_policy(c) -> None:
    r = c.put(
        f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial policy"}, headers=auth(ADMIN)
    )
    assert r.status_code == 200, r.text


def _gate(c, ev, token=CI, **params):
    return c.post("/v1/gate", json=ev, headers=auth(token), params=params)


def _status(c):
    r = c.get(f"/v1/models/{NAME}/status", headers=auth(READ))
    assert r.status_code == 200, r.text
    return r.json()


def _rev(c) -> int:
    return next(a["revision"] for a in _status(c)["aliases"] if a["alias"] == "champion")


def test_gate_promote_reject_override_rollback_and_mlflow_agree(client, make_artifact, settings_factory):
    """First gate promotes (no champion: non-inferiority N/A); a worse candidate is rejected and cannot be
    promoted without an admin override; rollbacks step back; the audit log is gapless; MLflow matches."""
    c = client
    _setup_policy(c)
    r1 = _gate(c, evidence(NAME, make_artifact("v1"), 0.5, seed=1))
    assert r1.status_code == 200, r1.text
    d1 = r1.json()["decision"]
    assert d1["verdict"] == "PROMOTE" and r1.json()["promoted"]["version"] == 1
    assert {x["criterion"]: x["status"] for x in d1["criteria"]}["non_inferiority"] == "NOT_APPLICABLE"

    r2 = _gate(c, evidence(NAME, make_artifact("v2"), 0.55, seed=1))
    assert r2.json()["decision"]["verdict"] == "PROMOTE", r2.json()["decision"]["criteria"]
    assert r2.json()["decision"]["champion_version"] == 1 and _status(c)["champion"]["version"] == 2

    bad = evidence(NAME, make_artifact("v3"), 0.1, seed=1)
    r3 = _gate(c, bad)
    d3 = r3.json()["decision"]
    assert d3["verdict"] == "REJECT" and r3.json()["promoted"] is None
    failing = {x["criterion"] for x in d3["criteria"] if x["status"] == "FAIL"}
    assert {"floor", "non_inferiority"} <= failing
    assert all(x["detail"] for x in d3["criteria"])

    rev = _rev(c)
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/promote",
        json={"version": 3, "expected_revision": rev, "reason": "try it"},
        headers=auth(CI),
    )
    assert r.status_code == 409 and "gate" in r.json()["detail"] and "floor" in r.json()["detail"]
    body = {"version": 3, "expected_revision": rev, "reason": "incident override", "override": True}
    assert (
        c.post(f"/v1/models/{NAME}/aliases/champion/promote", json=body, headers=auth(CI)).status_code == 403
    )
    r = c.post(f"/v1/models/{NAME}/aliases/champion/promote", json=body, headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["version"] == 3 and r.json()["revision"] == rev + 1

    # stale revision -> 409, nothing written
    n_events = len(c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json())
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": rev, "reason": "stale"},
        headers=auth(CI),
    )
    assert r.status_code == 409 and "expected_revision" in r.json()["detail"]
    assert len(c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()) == n_events

    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": rev + 1, "reason": "bad override"},
        headers=auth(CI),
    )
    assert r.status_code == 200 and r.json()["version"] == 2
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": rev + 2, "reason": "again"},
        headers=auth(CI),
    )
    assert r.status_code == 200 and r.json()["version"] == 1, (
        "repeated rollback steps back, it does not toggle"
    )
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": rev + 3, "reason": "none left"},
        headers=auth(CI),
    )
    assert r.status_code == 409
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": rev + 3, "reason": "named", "to_version": 3},
        headers=auth(CI),
    )
    assert r.status_code == 200 and r.json()["version"] == 3

    history = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    moves = [e for e in history if e["alias"] == "champion"]
    assert [e["alias_revision"] for e in moves] == list(range(1, len(moves) + 1))
    override = next(e for e in moves if e["override"])
    assert override["actor"] == "bootstrap-admin" and override["reason"] == "incident override"
    assert moves[0]["decision_id"] == d1["id"] and moves[0]["policy_version"] == 1

    assert c.post("/v1/reconcile", headers=auth(ADMIN)).json()["pending"] == 0
    st = _status(c)
    assert st["mlflow_aliases"] == {"champion": 3} and st["pending_mlflow_writes"] == 0
    uri = settings_factory().mlflow_tracking_uri
    mlc = MlflowClient(tracking_uri=uri, registry_uri=uri)  # explicit: never the process-global registry URI
    assert [int(v.version) for v in mlc.search_model_versions(f"name='{NAME}'")] == [3, 2, 1]


def test_tampered_artifact_refused_at_promote_and_registration(client_no_mlflow, make_artifact):
    c = client_no_mlflow
    _setup_policy(c)
    a1 = make_artifact("v1")
    assert _gate(c, evidence(NAME, a1, 0.5)).json()["decision"]["verdict"] == "PROMOTE"
    a2 = make_artifact("v2")
    assert _gate(c, evidence(NAME, a2, 0.5), promote="false").json()["decision"]["verdict"] == "PROMOTE"
    (a2 / "model.safetensors").write_bytes(b"tampered")
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/promote",
        json={"version": 2, "expected_revision": 1, "reason": "go now"},
        headers=auth(CI),
    )
    assert r.status_code == 409 and "model.safetensors" in r.json()["detail"]
    assert _status(c)["champion"]["version"] == 1
    a3 = make_artifact("v3")
    (a3 / "weights.pkl").write_bytes(b"cos\nsystem\n")
    r = c.post(f"/v1/models/{NAME}/versions", json={"artifact_path": str(a3)}, headers=auth(CI))
    assert r.status_code == 422 and "weights.pkl" in r.json()["detail"]


def test_idempotent_retries_change_state_once(client_no_mlflow, make_artifact):
    c = client_no_mlflow
    _setup_policy(c)
    _gate(c, evidence(NAME, make_artifact("v1"), 0.5))
    _gate(c, evidence(NAME, make_artifact("v2"), 0.5), promote="false")
    body = {"version": 2, "expected_revision": 1, "reason": "retry me"}
    h = {**auth(CI), "Idempotency-Key": "promote-v2-abc"}
    responses = [
        c.post(f"/v1/models/{NAME}/aliases/champion/promote", json=body, headers=h) for _ in range(5)
    ]
    assert {r.status_code for r in responses} == {200}
    assert len({r.text for r in responses}) == 1
    assert [r.headers.get("Idempotent-Replayed") for r in responses] == [None] + ["true"] * 4
    history = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()
    assert sum(e["action"] == "promote" for e in history) == 2
    r = c.post(f"/v1/models/{NAME}/aliases/champion/promote", json={**body, "reason": "different"}, headers=h)
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]


def test_retire_version_and_students_of_a_teacher(client_no_mlflow, make_artifact):
    c = client_no_mlflow
    _setup_policy(c)
    _gate(c, evidence(NAME, make_artifact("v1"), 0.5))
    _gate(c, evidence(NAME, make_artifact("v2"), 0.5))
    r = c.post(f"/v1/models/{NAME}/versions/1/retire", json={"reason": "license"}, headers=auth(CI))
    assert r.status_code == 403
    r = c.post(f"/v1/models/{NAME}/versions/1/retire", json={"reason": "license"}, headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["retired"][0]["status"] == "RETIRED"
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": 2, "reason": "back to v1", "to_version": 1},
        headers=auth(CI),
    )
    assert r.status_code == 409 and "retired" in r.json()["detail"]
    r = c.post(
        "/v1/teachers/retire",
        json={"teacher": "teacher@abc123", "reason": "teacher recalled"},
        headers=auth(ADMIN),
    )
    assert r.status_code == 200
    assert [v["version"] for v in r.json()["retired"]] == [1, 2] and r.json()["aliases_on_retired"] == [
        f"{NAME}@champion->v2"
    ]
    actions = [e["action"] for e in c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()]
    assert actions.count("retire") == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_auto_rollback_when_new_evidence_fails_the_champion(settings_factory, make_artifact, enabled):
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(settings_factory(mlflow_enabled=False, auto_rollback=enabled))) as c:
        _setup_policy(c)
        _gate(c, evidence(NAME, make_artifact("v1"), 0.5))
        _gate(c, evidence(NAME, make_artifact("v2"), 0.5))
        ev = evidence(NAME, make_artifact("unused"), 0.05)
        body = {k: ev[k] for k in ("suites", "cost", "lineage")}
        r = c.post(f"/v1/models/{NAME}/versions/2/evidence", json=body, headers=auth(CI))
        assert r.status_code == 200 and r.json()["verdict"] == "REJECT"
        champion = _status(c)["champion"]["version"]
        assert champion == (1 if enabled else 2)
        if enabled:
            last = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()[-1]
            assert last["action"] == "auto_rollback" and last["decision_id"] == r.json()["id"]


def test_lineage_joins_registry_and_mlflow(client, make_artifact, settings_factory, stack):
    import mlflow

    # process-wide for this test only: later tests must not talk to this store
    stack.enter_context(process_uris(settings_factory().mlflow_tracking_uri))
    with mlflow.start_run() as run:
        mlflow.log_metric("loss", 0.5)
        mlflow.set_tag("oprd.stage", "distill")
    _setup_policy(client)
    ev = evidence(NAME, make_artifact("v1"), 0.5)
    ev["lineage"]["mlflow_run_ids"] = {"distill": run.info.run_id}
    ev["mlflow_run_id"] = run.info.run_id
    assert _gate(client, ev).status_code == 200
    r = client.get(f"/v1/models/{NAME}/lineage", params={"alias": "champion"}, headers=auth(READ))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["version"]["version"] == 1 and out["decisions"][0]["verdict"] == "PROMOTE"
    assert out["mlflow"]["runs"]["distill"]["metrics"] == {"loss": 0.5}
    assert out["mlflow"]["runs"]["distill"]["tags"] == {"oprd.stage": "distill"}
    assert out["mlflow"]["model_version"]["aliases"] == ["champion"]
