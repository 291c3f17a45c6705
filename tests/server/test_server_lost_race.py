"""A move whose ``expected_revision`` is already stale is refused from a read snapshot: without the write lock
(under load most moves are such lost races, and they used to queue on the model lock only to fail), while a
retry whose Idempotency-Key is on record still replays its stored answer."""

from __future__ import annotations

import sqlite3

from conftest import ADMIN, CI, POLICY, auth, evidence
from fastapi.testclient import TestClient

from server.app import create_app

NAME = "student"


def test_stale_moves_are_refused_while_another_process_holds_the_write_lock(
    settings_factory, make_artifact, tmp_path
):
    settings = settings_factory(mlflow_enabled=False, sqlite_busy_timeout_ms=500)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "policy"}, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        for name, promote in (("v1", "true"), ("v2", "false")):
            r = c.post(
                "/v1/gate",
                json=evidence(NAME, make_artifact(name), 0.5),
                params={"promote": promote},
                headers=auth(CI),
            )
            assert r.status_code == 200, r.text
        url = f"/v1/models/{NAME}/aliases/champion"
        won = {"version": 2, "expected_revision": 1, "reason": "move on"}
        key = {**auth(CI), "Idempotency-Key": "won-race"}
        first = c.post(f"{url}/promote", json=won, headers=key)
        assert first.status_code == 200 and first.json()["revision"] == 2, first.text

        # Another process (a CLI on the same file) holds SQLite's write lock during the stale requests: a
        # request that needed it would wait out the busy timeout on every retry and then fail with a 5xx.
        other = sqlite3.connect(tmp_path / "registry.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            stale_promote = c.post(
                f"{url}/promote",
                json={"version": 1, "expected_revision": 1, "reason": "lost"},
                headers=auth(CI),
            )
            stale_rollback = c.post(
                f"{url}/rollback", json={"expected_revision": 1, "reason": "lost"}, headers=auth(CI)
            )
        finally:
            other.rollback()
            other.close()
        for r in (stale_promote, stale_rollback):
            assert r.status_code == 409, r.text
            assert r.json()["detail"] == f"expected_revision: {NAME}@champion is at revision 2, not 1"

        # The same stale expected_revision with the key of the move that won replays its answer, not a 409.
        replay = c.post(f"{url}/promote", json=won, headers=key)
        assert replay.status_code == 200 and replay.headers.get("Idempotent-Replayed") == "true"
        assert replay.text == first.text
