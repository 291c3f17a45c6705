"""Registry events (server.events) delivered to webhooks (server.webhooks): a real HTTP receiver thread, the app
in-process and as a real ``uvicorn`` subprocess killed with SIGKILL between commit and delivery, SQLite."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import ADMIN, CI, POLICY, READ, LiveServer, auth, evidence, server_env
from fastapi.testclient import TestClient
from typer.testing import CliRunner
from webhook_receiver import Receiver

from server.aliases import Move, move_alias
from server.app import create_app
from server.auth import Principal
from server.orm import RegistryEvent
from server.registry import get_model
from server.webhooks import sign, verify_signature

NAME = "student"
CLOUDEVENTS_FIELDS = {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "data"}
FAST = {"webhook_poll_s": 0.05, "webhook_retry_base_s": 0.05, "webhook_timeout_s": 2.0}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _add_webhook(c, url: str, **extra) -> str:
    r = c.post("/v1/webhooks", json={"name": "ops", "url": url, **extra}, headers=auth(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["secret"].startswith("whsec_")
    return r.json()["secret"]


def _gate(c, ev, **params):
    r = c.post("/v1/gate", json=ev, headers=auth(CI), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _rollback_then_retire_v2(c) -> None:
    """The sequence's last two changes: champion back to v1, then v2 retired (each must be a 200)."""
    r = c.post(
        f"/v1/models/{NAME}/aliases/champion/rollback",
        json={"expected_revision": _rev(c), "reason": "canary regression"},
        headers=auth(CI),
    )
    assert r.status_code == 200, r.text
    r = c.post(f"/v1/models/{NAME}/versions/2/retire", json={"reason": "license"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text


def _rev(c) -> int:
    s = c.get(f"/v1/models/{NAME}/status?mlflow=false", headers=auth(READ)).json()
    return next(a["revision"] for a in s["aliases"] if a["alias"] == "champion")


def _events(c) -> list[dict]:
    r = c.get("/v1/events", headers=auth(READ), params={"limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_promote_rollback_retire_each_event_delivered_once_and_signed(
    db, request, settings_factory, make_artifact, receiver
):
    """Every change of a policy -> promote -> promote -> rollback -> retire sequence reaches the receiver once by
    id, signed, with CloudEvents fields and the move's versions, decision and policy; the first attempt of each
    event fails (503) and is retried."""
    url = request.getfixturevalue("pg_fresh_url") if db == "postgresql" else None
    receiver.plan = lambda env, i: "fail" if i == 0 else "ok"
    with TestClient(create_app(settings_factory(url, mlflow_enabled=False, **FAST))) as c:
        receiver.secret = _add_webhook(c, receiver.url)
        assert (
            c.put(
                f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN)
            ).status_code
            == 200
        )
        g1 = _gate(c, evidence(NAME, make_artifact("v1"), 0.5, seed=1))
        _gate(c, evidence(NAME, make_artifact("v2"), 0.55, seed=1))
        _rollback_then_retire_v2(c)
        receiver.wait_processed(5)
        time.sleep(0.5)  # a late duplicate would arrive within a few poll periods
        listed = _events(c)

    types = [e["event"]["type"].rsplit(".", 1)[-1] for e in listed]
    assert types == ["policy_set", "promote", "promote", "rollback", "retire"]
    ids = [e["event"]["id"] for e in listed]
    assert sorted(receiver.processed) == sorted(ids) and not receiver.duplicates
    assert all(a.valid_signature for a in receiver.attempts)
    assert sorted(a.id for a in receiver.attempts) == sorted(ids * 2)  # one failed + one good attempt each
    for row in listed:
        assert [(d["webhook"], d["state"], d["attempts"]) for d in row["deliveries"]] == [
            ("ops", "delivered", 2)
        ]
        assert receiver.processed[row["event"]["id"]] == row["event"]  # delivered exactly what is listed
    envs = [receiver.processed[i] for i in ids]
    assert all(set(e) == CLOUDEVENTS_FIELDS and e["specversion"] == "1.0" for e in envs)
    policy_set, promote1, promote2, rollback, retire = (e["data"] for e in envs)
    assert policy_set["policy_version"] == 1 and policy_set["policy_id"] is not None
    assert (promote1["from_version"], promote1["to_version"]) == (None, 1)
    assert (
        promote1["decision_id"] == g1["decision"]["id"] and promote1["policy_id"] == policy_set["policy_id"]
    )
    assert promote1["links"]["decision"] == f"/v1/decisions/{g1['decision']['id']}"
    assert (promote2["from_version"], promote2["to_version"]) == (1, 2)
    assert (rollback["from_version"], rollback["to_version"], rollback["actor"]) == (2, 1, "ci-bot")
    assert (retire["version"], retire["reason"], envs[-1]["subject"]) == (2, "license", f"{NAME}/v2")
    assert envs[1]["subject"] == f"{NAME}@champion"


def test_rolled_back_transaction_leaves_no_event(settings_factory, make_artifact, receiver):
    """The event row is in the move's transaction: a move whose transaction rolls back never becomes an event."""
    with TestClient(create_app(settings_factory(mlflow_enabled=False, **FAST))) as c:
        receiver.secret = _add_webhook(c, receiver.url)
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN))
        _gate(c, evidence(NAME, make_artifact("v1"), 0.5, seed=1))
        _gate(c, evidence(NAME, make_artifact("v2"), 0.55, seed=1), promote="false")
        receiver.wait_processed(2)
        db = c.app.state.db

        def move_then_fail(s):
            model = get_model(s, NAME, lock=True)
            move_alias(s, Principal("t", "admin"), model, "champion", Move("promote", 2, 1, "doomed"))
            s.flush()
            assert s.query(RegistryEvent).count() == 3  # written, inside the transaction
            raise RuntimeError("abort after the move")

        with pytest.raises(RuntimeError):
            db.transact(move_then_fail)
        # a refused move (stale revision) commits nothing either
        r = c.post(
            f"/v1/models/{NAME}/aliases/champion/promote",
            json={"version": 2, "expected_revision": 7, "reason": "stale", "override": True},
            headers=auth(ADMIN),
        )
        assert r.status_code == 409
        c.app.state.deliverer.drain(5)
        assert len(_events(c)) == 2
    assert len(receiver.attempts) == 2 and len(receiver.processed) == 2


def test_webhook_admin_only_validated_and_removable(settings_factory, receiver):
    with TestClient(create_app(settings_factory(mlflow_enabled=False, **FAST))) as c:
        r = c.post("/v1/webhooks", json={"name": "x", "url": receiver.url}, headers=auth(CI))
        assert r.status_code == 403
        r = c.post("/v1/webhooks", json={"name": "x", "url": "file:///etc/passwd"}, headers=auth(ADMIN))
        assert r.status_code == 422 and "url" in r.text
        r = c.post("/v1/webhooks", json={"name": "x", "url": "http://[oops"}, headers=auth(ADMIN))
        assert r.status_code == 422 and "not a valid URL" in r.json()["detail"]  # found by schemathesis
        r = c.post(
            "/v1/webhooks", json={"name": "x", "url": receiver.url, "types": ["nope"]}, headers=auth(ADMIN)
        )
        assert r.status_code == 422
        receiver.secret = _add_webhook(c, receiver.url)
        r = c.post("/v1/webhooks", json={"name": "ops", "url": receiver.url}, headers=auth(ADMIN))
        assert r.status_code == 409 and "exists" in r.json()["detail"]
        listed = c.get("/v1/webhooks", headers=auth(ADMIN)).json()
        assert [h["name"] for h in listed] == ["ops"] and "secret" not in listed[0]
        assert c.get("/v1/webhooks", headers=auth(READ)).status_code == 403
        assert c.delete("/v1/webhooks/ops", headers=auth(ADMIN)).status_code == 200
        assert c.delete("/v1/webhooks/ops", headers=auth(ADMIN)).status_code == 404
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN))
        c.app.state.deliverer.drain(5)
        assert _events(c)[0]["deliveries"] == [] and receiver.attempts == []


def test_signature_is_standard_webhooks_hmac():
    """Known-answer check of the signing scheme (HMAC-SHA256 over "id.timestamp.body", base64 key after whsec_)."""
    import base64
    import hashlib
    import hmac

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"a":1}'
    expected = base64.b64encode(hmac.new(b"k" * 32, b"msg_1.1700000000." + body, hashlib.sha256).digest())
    assert sign(secret, "msg_1", 1700000000, body) == "v1," + expected.decode()
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": sign(secret, "msg_1", 1700000000, body),
    }
    assert verify_signature(secret, headers, body, now=1700000010)
    assert not verify_signature(secret, headers, body + b" ", now=1700000010)
    assert not verify_signature(secret, headers, body, now=1700009999)  # stale timestamp: replay refused


def test_kill_9_between_commit_and_delivery_delivers_each_event_once(tmp_path, make_artifact, receiver):
    """A real ``uvicorn`` server on SQLite is SIGKILLed twice while a delivery is in flight: (1) the receiver holds
    the promote's first POST without processing it; (2) it processes the next promote and holds the 200. After
    each restart the event is delivered again with the same id: (1) is processed once, (2) arrives twice and
    the receiver's id de-duplication keeps it at once. Every event of promote -> promote -> rollback -> retire
    is processed exactly once, with a valid signature."""
    env = server_env(
        tmp_path,
        OPRD_MLFLOW_ENABLED="false",
        OPRD_WEBHOOK_POLL_S="0.05",
        OPRD_WEBHOOK_RETRY_BASE_S="0.05",
        OPRD_WEBHOOK_TIMEOUT_S="1.0",
    )
    log = tmp_path / "server.log"
    holds = {"promote": ["hold", "process-then-hold"]}

    def plan(envelope: dict, i: int) -> str:
        kind = envelope["type"].rsplit(".", 1)[-1]
        if i == 0 and holds.get(kind):
            return holds[kind].pop(0)
        return "ok"

    receiver.plan = plan
    srv = LiveServer(env, log)
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        receiver.secret = _add_webhook(c, receiver.url)
        assert (
            c.put(
                f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN)
            ).status_code
            == 200
        )
        receiver.wait_processed(1)
        for round_, (artifact, acc) in enumerate([("v1", 0.5), ("v2", 0.55)], start=1):
            _gate(c, evidence(NAME, make_artifact(artifact), acc, seed=1))  # committed: 200
            assert receiver.held.wait(30), "the delivery never started"
            held_id = receiver.attempts[-1].id
            os.kill(srv.proc.pid, signal.SIGKILL)  # between the commit and a delivery the server saw succeed
            srv.proc.wait(10)
            receiver.release.set()
            receiver.held, receiver.release = threading.Event(), threading.Event()
            srv.log.close()
            srv = LiveServer(env, log)
            c = httpx.Client(base_url=srv.url, timeout=30)
            receiver.wait_processed(1 + round_)
            deadline = (
                time.monotonic() + 30
            )  # the restarted server resends it once the killed one's lease ends
            while [a.id for a in receiver.attempts].count(held_id) < 2:
                assert time.monotonic() < deadline, "the held delivery was never resent"
                time.sleep(0.05)
        _rollback_then_retire_v2(c)
        receiver.wait_processed(5)
        time.sleep(0.5)
        listed = _events(c)
    finally:
        srv.stop()

    ids = [e["event"]["id"] for e in listed]
    assert [e["event"]["type"].rsplit(".", 1)[-1] for e in listed] == [
        "policy_set",
        "promote",
        "promote",
        "rollback",
        "retire",
    ]
    assert sorted(receiver.processed) == sorted(ids)  # each event processed exactly once
    assert all(a.valid_signature for a in receiver.attempts)
    promote1, promote2 = ids[1], ids[2]
    assert [a.id for a in receiver.attempts].count(promote1) == 2  # held + cut by the kill, then delivered
    assert receiver.duplicates == [
        promote2
    ]  # processed, 200 never seen by the killed server, resent, de-duplicated
    assert all(d["state"] == "delivered" for e in listed for d in e["deliveries"])
    assert {e["event"]["id"]: e["deliveries"][0]["attempts"] for e in listed}[promote1] == 2


def test_cli_events_and_webhooks_in_process(tmp_path, make_artifact, receiver, monkeypatch):
    """``oprd-ci webhooks add|list|remove`` and ``oprd-ci events``; an in-process command delivers its own events
    before it exits (no server running)."""
    import typer

    from oprd_ci.registry_cli import register

    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false", OPRD_WEBHOOK_POLL_S="0.05").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    cli = typer.Typer()
    register(cli)
    run = CliRunner().invoke
    r = run(cli, ["webhooks", "add", "ops", receiver.url, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    receiver.secret = json.loads(r.stdout)["secret"]
    r = run(cli, ["policy", "set", NAME, "--file", "policies/default.yaml", "--reason", "initial"])
    assert r.exit_code == 0, r.output
    assert len(receiver.processed) == 1 and receiver.attempts[0].valid_signature  # delivered before exit
    r = run(cli, ["events", "--json"])
    rows = json.loads(r.stdout)
    assert rows[0]["event"]["type"] == "dev.oprd.registry.policy_set"
    assert rows[0]["deliveries"][0]["state"] == "delivered"
    r = run(cli, ["events"])
    assert r.exit_code == 0 and "policy_set" in r.output and "ops: delivered" in r.output
    r = run(cli, ["webhooks", "list"])
    assert r.exit_code == 0 and "delivered 1" in r.output
    r = run(cli, ["webhooks", "add", "bad", "ftp://x"])
    assert r.exit_code == 2 and "url" in r.output
    r = run(cli, ["webhooks", "redeliver", "ops"])
    assert r.exit_code == 0 and "0 delivery(ies) due again" in r.output  # nothing dead
    r = run(cli, ["webhooks", "redeliver", "ops", "--event", str(rows[0]["seq"])])
    assert r.exit_code == 6 and "no dead delivery" in r.output
    assert run(cli, ["webhooks", "remove", "ops"]).exit_code == 0
    assert run(cli, ["webhooks", "remove", "ops"]).exit_code == 6


def test_auto_rollback_emits_an_event(settings_factory, make_artifact, receiver):
    """The server's own move (new evidence against the champion fails the policy) is an event like any other."""
    with TestClient(create_app(settings_factory(mlflow_enabled=False, auto_rollback=True, **FAST))) as c:
        receiver.secret = _add_webhook(c, receiver.url, types=["dev.oprd.registry.auto_rollback"])
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN))
        _gate(c, evidence(NAME, make_artifact("v1"), 0.5))
        _gate(c, evidence(NAME, make_artifact("v2"), 0.5))
        ev = evidence(NAME, make_artifact("unused"), 0.05)
        r = c.post(
            f"/v1/models/{NAME}/versions/2/evidence",
            json={k: ev[k] for k in ("suites", "cost", "lineage")},
            headers=auth(CI),
        )
        assert r.status_code == 200 and r.json()["verdict"] == "REJECT"
        receiver.wait_processed(1)
        c.app.state.deliverer.drain(5)
    (only,) = receiver.processed.values()  # the subscription's type filter left out the other four events
    assert only["type"] == "dev.oprd.registry.auto_rollback"
    data = only["data"]
    assert (data["from_version"], data["to_version"], data["actor"]) == (2, 1, "system:auto-rollback")
    assert data["decision_id"] == r.json()["id"] and data["policy_version"] == 1


def test_two_deliverers_on_postgres_post_each_delivery_once(pg_fresh_url, settings_factory, receiver):
    """Two processes' deliverers (``serve --workers 2``) on one PostgreSQL database: the dispatch row locks and the
    delivery leases let exactly one of them POST each event."""
    from server.db import Database
    from server.webhooks import Deliverer

    settings = settings_factory(pg_fresh_url, mlflow_enabled=False, **FAST)
    with TestClient(create_app(settings, run_reconciler=False)) as c:
        receiver.secret = _add_webhook(c, receiver.url)
        for i in range(20):
            r = c.put(f"/v1/models/m{i}/policy", json={"spec": POLICY, "reason": "many"}, headers=auth(ADMIN))
            assert r.status_code == 200
    dbs = [Database(settings) for _ in range(2)]
    deliverers = [Deliverer(db, settings) for db in dbs]
    threads = [threading.Thread(target=d.drain, args=(30,)) for d in deliverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for db in dbs:
        db.dispose()
    ids = [a.id for a in receiver.attempts]
    assert len(ids) == 20 and len(set(ids)) == 20 and not receiver.duplicates


def test_dead_delivery_degrades_health_until_redelivered(settings_factory, make_artifact, receiver):
    """A receiver that is down past the attempts makes its delivery ``dead``: ``/health`` says ``degraded`` and
    counts it; ``POST /v1/webhooks/ops/redeliver`` (admin) sends the same event id again once it is fixed."""
    down = {"on": True}
    receiver.plan = lambda env, i: "fail" if down["on"] else "ok"
    settings = settings_factory(mlflow_enabled=False, webhook_max_attempts=2, **FAST)
    with TestClient(create_app(settings)) as c:
        receiver.secret = _add_webhook(c, receiver.url)
        assert c.get("/health").json()["dead_webhook_deliveries"] == 0
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "initial"}, headers=auth(ADMIN))
        deadline = time.monotonic() + 20
        while c.get("/health").json()["dead_webhook_deliveries"] != 1:
            assert time.monotonic() < deadline, c.get("/health").json()
            time.sleep(0.05)
        health = c.get("/health").json()
        assert health["status"] == "degraded" and health["pending_webhook_deliveries"] == 0
        assert len(receiver.attempts) == 2 and not receiver.processed
        seq = _events(c)[0]["seq"]
        r = c.post("/v1/webhooks/ops/redeliver", json={"event": seq}, headers=auth(CI))
        assert r.status_code == 403
        r = c.post("/v1/webhooks/ops/redeliver", json={"event": seq + 99}, headers=auth(ADMIN))
        assert r.status_code == 404 and "no dead delivery" in r.json()["detail"]
        down["on"] = False
        r = c.post("/v1/webhooks/ops/redeliver", json={}, headers=auth(ADMIN))
        assert r.status_code == 200 and r.json() == {"name": "ops", "redelivered": 1}
        receiver.wait_processed(1)
        c.app.state.deliverer.drain(5)
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["dead_webhook_deliveries"] == 0
        [ev] = _events(c)
        assert ev["deliveries"][0]["state"] == "delivered"
        assert [a.id for a in receiver.attempts] == [ev["event"]["id"]] * 3  # the same event id, sent again
        r = c.post("/v1/webhooks/ops/redeliver", json={}, headers=auth(ADMIN))
        assert r.json()["redelivered"] == 0
