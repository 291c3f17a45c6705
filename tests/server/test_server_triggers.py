"""Triggers in the registry (server.triggers): one row per de-duplication key, baselines start nothing, at most one
queued or running cycle per model (also under concurrent claims), pending triggers coalesce into the newest, and
the gate links its decision to the trigger of its cycle in the decision's transaction. Real SQLite, real HTTP
routes (TestClient), real tokens."""

from __future__ import annotations

import threading

import pytest
from conftest import ADMIN, CI, POLICY, READ, auth, evidence
from fastapi.testclient import TestClient

from server.app import create_app

NAME = "student"


def _submit(c, key: str, kind: str = "teacher_version", **extra):
    body = {"kind": kind, "key": key, **extra}
    r = c.post(f"/v1/models/{NAME}/triggers", json=body, headers=auth(CI))
    assert r.status_code == 200, r.text
    return r.json()


def _claim(c):
    r = c.post(f"/v1/models/{NAME}/triggers/claim", json={"exp_prefix": "watch"}, headers=auth(CI))
    assert r.status_code == 200, r.text
    return r.json()["trigger"]


def _triggers(c):
    r = c.get(f"/v1/models/{NAME}/triggers", headers=auth(READ))
    assert r.status_code == 200, r.text
    return {t["id"]: t for t in r.json()}


def test_same_key_is_one_trigger_and_a_baseline_starts_nothing(client_no_mlflow):
    c = client_no_mlflow
    first = _submit(c, "teacher-version:t/1", overrides={"models.teacher.revision": "models:/t/1"})
    again = _submit(c, "teacher-version:t/1", overrides={"models.teacher.revision": "other"})
    assert first["created"] and not again["created"]
    assert again["trigger"]["id"] == first["trigger"]["id"]
    assert again["trigger"]["overrides"] == {
        "models.teacher.revision": "models:/t/1"
    }  # the first row, unchanged
    base = _submit(c, "failure-bank:aaa", kind="failure_bank", info={"rows": 3}, baseline=True)
    assert base["trigger"]["status"] == "baseline"
    grown = _submit(c, "failure-bank:bbb", kind="failure_bank", info={"rows": 30}, baseline=True)
    assert grown["trigger"]["status"] == "pending"  # a source's first observation only is the baseline
    assert len(_triggers(c)) == 3
    r = c.post(
        f"/v1/models/{NAME}/triggers", json={"kind": "teacher_version", "key": "k/1"}, headers=auth(READ)
    )
    assert r.status_code == 403


def test_one_cycle_at_a_time_and_pending_triggers_coalesce_into_the_newest(client_no_mlflow):
    c = client_no_mlflow
    t1 = _submit(c, "teacher-version:t/1", overrides={"models.teacher.path": "/t1", "a": 1})["trigger"]
    cycle = _claim(c)
    assert cycle["id"] == t1["id"] and cycle["status"] == "queued"
    assert cycle["exp_name"] == f"watch-{NAME}-t{t1['id']}"
    t2 = _submit(c, "teacher-version:t/2", overrides={"models.teacher.path": "/t2", "b": 2})["trigger"]
    t3 = _submit(c, "teacher-version:t/3", overrides={"models.teacher.path": "/t3"})["trigger"]
    assert _claim(c) is None  # t1's cycle is queued: later triggers wait
    r = c.post(f"/v1/models/{NAME}/triggers/{t1['id']}/state", json={"status": "running"}, headers=auth(CI))
    assert r.json()["status"] == "running"
    assert _claim(c) is None
    r = c.post(
        f"/v1/models/{NAME}/triggers/{t1['id']}/state",
        json={"status": "failed", "error": "experiment failed"},
        headers=auth(CI),
    )
    assert r.json()["status"] == "failed" and r.json()["error"] == "experiment failed"
    r = c.post(f"/v1/models/{NAME}/triggers/{t1['id']}/state", json={"status": "running"}, headers=auth(CI))
    assert r.status_code == 409  # a finished trigger is not reopened
    cycle = _claim(c)
    assert cycle["id"] == t3["id"]
    assert cycle["overrides"] == {"models.teacher.path": "/t3", "b": 2}  # the newest wins, older keys kept
    rows = _triggers(c)
    assert rows[t2["id"]]["status"] == "coalesced" and rows[t2["id"]]["coalesced_into"] == t3["id"]
    assert [t["id"] for t in rows.values() if t["status"] in ("queued", "running")] == [t3["id"]]


def test_concurrent_claims_queue_exactly_one_cycle(settings_factory):
    """Eight watchers claim at once, through eight apps on one database: one gets the cycle."""
    settings = settings_factory(mlflow_enabled=False)
    clients = [TestClient(create_app(settings, run_reconciler=False)) for _ in range(8)]
    for key in ("teacher-version:t/1", "teacher-version:t/2"):
        _submit(clients[0], key)
    barrier, got = threading.Barrier(len(clients)), []

    def claim(c):
        barrier.wait()
        got.append(_claim(c))

    threads = [threading.Thread(target=claim, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [g for g in got if g is not None]
    assert len(got) == 8 and len(claimed) == 1, got
    assert [t["status"] for t in _triggers(clients[0]).values()] == ["coalesced", "queued"]


def test_the_gate_links_its_decision_to_the_trigger_of_its_cycle(client_no_mlflow, make_artifact):
    c = client_no_mlflow
    r = c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "triggers"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    t = _submit(c, "teacher-version:t/1")["trigger"]
    ev = evidence(NAME, make_artifact("v1"), 0.9)
    r = c.post("/v1/gate", json=ev, params={"trigger_id": t["id"]}, headers=auth(CI))
    assert r.status_code == 422 and "pending" in r.text  # not claimed: no cycle to end
    assert c.get(f"/v1/models/{NAME}/versions", headers=auth(READ)).json() == []  # nothing recorded
    _claim(c)
    r = c.post("/v1/gate", json=ev, params={"trigger_id": t["id"]}, headers=auth(CI))
    assert r.status_code == 200, r.text
    decision = r.json()["decision"]
    assert decision["trigger_id"] == t["id"]
    row = _triggers(c)[t["id"]]
    assert (row["status"], row["decision_id"], row["verdict"], row["version"]) == (
        "done",
        decision["id"],
        decision["verdict"],
        1,
    )
    assert c.get(f"/v1/decisions/{decision['id']}", headers=auth(READ)).json()["trigger_id"] == t["id"]
    ev2 = evidence(NAME, make_artifact("v2"), 0.9, seed=2)
    r = c.post("/v1/gate", json=ev2, params={"trigger_id": t["id"]}, headers=auth(CI))
    assert r.status_code == 422 and "done" in r.text  # one cycle, one decision
    r = c.post("/v1/gate", json=ev2, params={"trigger_id": 999}, headers=auth(CI))
    assert r.status_code == 422


@pytest.mark.parametrize("body", [{"kind": "nope", "key": "abc"}, {"kind": "policy", "key": "a b"}])
def test_bad_trigger_is_refused(client_no_mlflow, body):
    r = client_no_mlflow.post(f"/v1/models/{NAME}/triggers", json=body, headers=auth(CI))
    assert r.status_code == 422
