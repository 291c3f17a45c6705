"""Issue 19, the registry under MLflow faults: an MLflow that accepts connections and never answers (a "black hole"
TCP listener), and a real MLflow server behind a small real HTTP proxy that answers chosen requests with MLflow's
error JSON and status. Checks that passes are bounded, ``/health`` tells the truth, a poisoned write never blocks
the others (retried or parked by class), parked writes are visible and handled by admin commands, and that what
MLflow can never hold is refused up front."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from conftest import (
    ADMIN,
    CI,
    POLICY,
    READ,
    LiveServer,
    auth,
    evidence,
    running_mlflow_server,
    server_env,
)
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from typer.testing import CliRunner

from oprd_ci import outbox_cli
from oprd_ci.registry_cli import EXIT_USAGE, register
from server.app import create_app


# ------------------------------------------------------------------------------------------------ fault servers
class BlackHole:
    """A TCP listener that accepts connections and never answers (a hung MLflow behind a load balancer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)  # kept open, never read from or written to

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            c.close()


Rule = Callable[[str, str, dict[str, Any]], tuple[int, str] | None]


class FaultProxy:
    """A real HTTP proxy in front of a real MLflow server. Each request is offered to ``rules`` (method, path,
    JSON body) in order; the first that returns ``(status, error_code)`` answers with MLflow's error JSON and that
    status (recorded in ``faulted``); otherwise the request is forwarded unchanged."""

    def __init__(self, upstream: str) -> None:
        self.rules: list[Rule] = []
        self.faulted: list[tuple[str, dict[str, Any]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                for rule in list(proxy.rules):
                    if (hit := rule(self.command, self.path, body)) is not None:
                        status, code = hit
                        proxy.faulted.append((self.path, body))
                        out = json.dumps({"error_code": code, "message": f"injected {code}"}).encode()
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(out)))
                        self.end_headers()
                        self.wfile.write(out)
                        return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
                }
                r = httpx.request(
                    self.command, upstream + self.path, content=raw, headers=headers, timeout=30
                )
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fault_alias(self, alias: str, status: int, code: str) -> None:
        """Answer every ``set_registered_model_alias`` of ``alias`` with ``status`` / ``code``."""
        self.rules.append(
            lambda m, p, b: (
                (status, code) if p.endswith("/registered-models/alias") and b.get("alias") == alias else None
            )
        )

    def hits(self, alias: str) -> int:
        return sum(1 for _, b in self.faulted if b.get("alias") == alias)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One lean real ``mlflow server`` for this module (models are named per test, so tests do not collide)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture
def proxy(mlflow_url: str) -> Iterator[FaultProxy]:
    p = FaultProxy(mlflow_url)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    h = BlackHole()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(autouse=True)
def _mlflow_client_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only for MlflowClient calls (the test's own, and the pre-fix applier's): without it the pre-fix code sits in
    # MLflow's 7 retries with backoff for minutes on a 500 instead of failing the test in seconds.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


FAST = {
    "sync_wait_s": 0,
    "mlflow_write_timeout_s": 2.0,
    "reconcile_pass_deadline_s": 6.0,
    "mlflow_retry_base_s": 0.1,
    "mlflow_retry_max_s": 0.2,
    "mlflow_internal_error_attempts": 2,
    "mlflow_pending_grace_s": 1.0,
    "mlflow_validate_timeout_s": 1.0,
}


# ------------------------------------------------------------------------------------------------ helpers
class Registry:
    """An in-process registry (TestClient) whose reconciler the test drives pass by pass."""

    def __init__(self, c: TestClient, run_id: str, make_artifact: Callable[..., Path]) -> None:
        self.c, self.run_id, self.make_artifact = c, run_id, make_artifact
        self.reconciler = c.app.state.reconciler  # type: ignore[attr-defined]
        self._n = 0

    def gate(self, model: str, *, alias: str = "champion", promote: bool = True) -> httpx.Response:
        if self.c.get(f"/v1/models/{model}/policy", headers=auth(READ)).status_code == 404:
            r = self.c.put(
                f"/v1/models/{model}/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN)
            )
            assert r.status_code == 200, r.text
        self._n += 1
        ev = {**evidence(model, self.make_artifact(f"{model}-{self._n}"), 0.5),
              "mlflow_source": f"runs:/{self.run_id}/model", "mlflow_run_id": self.run_id}  # fmt: skip
        return self.c.post("/v1/gate", json=ev, headers=auth(CI), params={"alias": alias, "promote": promote})

    def promote(self, model: str, alias: str, version: int) -> httpx.Response:
        st = self.c.get(f"/v1/models/{model}/status", params={"mlflow": False}, headers=auth(READ)).json()
        rev = next((a["revision"] for a in st["aliases"] if a["alias"] == alias), 0)
        body = {"version": version, "expected_revision": rev, "reason": "test move"}
        return self.c.post(f"/v1/models/{model}/aliases/{alias}/promote", json=body, headers=auth(CI))

    def passes(self, until: Callable[[], bool], *, max_s: float = 20.0) -> None:
        deadline = time.monotonic() + max_s
        while True:
            self.reconciler.run_once()
            if until() or time.monotonic() > deadline:
                return
            time.sleep(0.15)

    def outbox(self, parked: bool = False) -> list[dict[str, Any]]:
        r = self.c.get("/v1/outbox", params={"parked": parked}, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        return r.json()

    def history(self, model: str) -> list[dict[str, Any]]:
        return self.c.get(f"/v1/models/{model}/history", headers=auth(READ)).json()


@pytest.fixture
def registry_factory(settings_factory, make_artifact, mlflow_url) -> Iterator[Callable[..., Registry]]:
    made: list[TestClient] = []
    run_id = MlflowClient(mlflow_url).create_run("0").info.run_id

    def make(uri: str, **overrides: Any) -> Registry:
        settings = settings_factory(mlflow_tracking_uri=uri, **{**FAST, **overrides})
        c = TestClient(create_app(settings, run_reconciler=False), raise_server_exceptions=False)
        c.__enter__()
        made.append(c)
        return Registry(c, run_id, make_artifact)

    yield make
    for c in made:
        c.__exit__(None, None, None)


def _name(request: pytest.FixtureRequest, base: str) -> str:
    """A model name unique to this test (the MLflow server is shared by the module)."""
    suffix = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[-60:]
    return f"{base}-{suffix}".strip("-")


# ------------------------------------------------------------------------------------------------ A + B: black hole
def test_black_hole_health_degraded_and_reconcile_answers_promptly(tmp_path, make_artifact, hole):
    """MLflow accepts connections and never answers: within seconds ``/health`` says ``degraded`` with the age of
    the oldest pending write and the error, and ``POST /v1/reconcile`` answers (it does not wait on a stuck pass)."""
    env = server_env(
        tmp_path,
        OPRD_MLFLOW_TRACKING_URI=hole.url,
        OPRD_SYNC_WAIT_S="0",
        OPRD_MLFLOW_WRITE_TIMEOUT_S="1",
        OPRD_RECONCILE_PASS_DEADLINE_S="3",
        OPRD_MLFLOW_PENDING_GRACE_S="1",
    )
    srv = LiveServer(env, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
            run = "0123456789abcdef0123456789abcdef"
            ev = {**evidence("student", make_artifact("v1"), 0.5), "mlflow_source": f"runs:/{run}/model",
                  "mlflow_run_id": run}  # fmt: skip
            assert c.post("/v1/gate", json=ev, headers=auth(CI)).status_code == 200
            deadline, h = time.monotonic() + 15, {}
            while time.monotonic() < deadline:
                h = c.get("/health", timeout=5).json()
                if (
                    h["status"] == "degraded"
                    and (h.get("oldest_pending_age_s") or 0) >= 1
                    and h["last_mlflow_error"]
                ):
                    break
                time.sleep(0.2)
            assert h["status"] == "degraded", h
            assert h["pending_mlflow_writes"] == 2 and h["oldest_pending_age_s"] >= 1, h
            assert "no answer" in h["last_mlflow_error"] or "Timeout" in h["last_mlflow_error"], h
            for _ in range(2):  # one may find the background pass running (202), none may hang
                t0 = time.monotonic()
                r = c.post("/v1/reconcile", headers=auth(ADMIN), timeout=20)
                assert r.status_code in (200, 202), r.text
                assert time.monotonic() - t0 < 15  # generous: a pass is bounded by its 3 s deadline
                assert r.json()["pending"] == 2 and r.json()["errors"]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ C: error classes
@pytest.mark.parametrize(
    ("status", "code", "outcome", "tries"),
    [
        (400, "INVALID_PARAMETER_VALUE", "parked", 1),
        (404, "RESOURCE_DOES_NOT_EXIST", "parked", 1),
        (500, "INTERNAL_ERROR", "parked", 2),  # mlflow_internal_error_attempts=2
        (503, "TEMPORARILY_UNAVAILABLE", "pending", None),
        (429, "REQUEST_LIMIT_EXCEEDED", "pending", None),
    ],
)
def test_a_poisoned_write_is_retried_or_parked_and_never_blocks_later_writes(
    request, registry_factory, proxy, mlflow_url, status, code, outcome, tries
):
    alpha, beta = _name(request, "alpha"), _name(request, "beta")
    proxy.fault_alias("poison", status, code)
    reg = registry_factory(proxy.url)
    assert reg.gate(alpha).status_code == 200
    reg.passes(lambda: reg.reconciler.stats.pending == 0)
    assert reg.promote(alpha, "poison", 1).status_code == 200
    reg.reconciler.run_once()  # the poisoned write is tried first, and fails
    assert proxy.hits("poison") == 1
    # later writes: another model, another alias of the same model, a new version of the same model
    assert reg.gate(beta).status_code == 200
    assert reg.promote(alpha, "staging", 1).status_code == 200
    assert reg.gate(alpha, promote=False).status_code == 200

    def settled() -> bool:
        rows = reg.outbox()
        poison = [r for r in rows if r["payload"].get("alias") == "poison"]
        others_done = len(rows) == 1
        if outcome == "parked":
            return others_done and poison[0]["state"] == "parked"
        return others_done and poison[0]["attempts"] >= 3

    reg.passes(settled)
    ml = MlflowClient(mlflow_url)
    assert ml.get_registered_model(beta).aliases == {"champion": "1"}
    assert ml.get_registered_model(alpha).aliases == {"champion": "1", "staging": "1"}
    assert ml.get_model_version(alpha, "2").version == "2"
    [row] = reg.outbox()
    assert row["state"] == outcome and code in row["last_error"], row
    if tries is not None:
        assert proxy.hits("poison") == tries  # refused: never retried; internal: retried up to its budget
    else:
        assert proxy.hits("poison") >= 3 and row["next_attempt_at"]  # retried with backoff, not parked
    h = reg.c.get("/health").json()
    assert (
        h["status"] == "degraded"
        and (h["parked_mlflow_writes"] if outcome == "parked" else h["failing_mlflow_writes"]) == 1
    )


# ------------------------------------------------------------------------------------------------ C: admin commands
def test_parked_write_is_visible_keeps_drift_repair_and_admin_retry_drop_work(
    request, registry_factory, proxy, mlflow_url, tmp_path, monkeypatch
):
    alpha = _name(request, "alpha")
    proxy.fault_alias("poison", 400, "INVALID_PARAMETER_VALUE")
    proxy.fault_alias("doomed", 400, "INVALID_PARAMETER_VALUE")
    reg = registry_factory(proxy.url)
    assert reg.gate(alpha).status_code == 200
    assert reg.gate(alpha, promote=False).status_code == 200
    assert reg.promote(alpha, "poison", 1).status_code == 200
    assert reg.promote(alpha, "doomed", 1).status_code == 200
    reg.passes(lambda: len(reg.outbox(parked=True)) == 2)
    parked = reg.outbox(parked=True)
    assert [p["payload"]["alias"] for p in parked] == ["poison", "doomed"]
    # visible: health, status, history
    h = reg.c.get("/health").json()
    assert h["status"] == "degraded" and h["parked_mlflow_writes"] == 2 and h["pending_mlflow_writes"] == 0
    st = reg.c.get(f"/v1/models/{alpha}/status", headers=auth(READ)).json()
    assert st["parked_mlflow_writes"] == 2 and "INVALID_PARAMETER_VALUE" in st["last_mlflow_error"]
    assert st["mlflow_state"] == "degraded"
    assert [e["alias"] for e in reg.history(alpha) if e["action"] == "mlflow_parked"] == ["poison", "doomed"]
    # a parked row does not switch off drift repair for the rest of the model
    ml = MlflowClient(mlflow_url)
    ml.set_registered_model_alias(alpha, "champion", "2")
    fixed = reg.reconciler.run_once(check_drift=True).drift_fixed
    assert fixed == [f"{alpha}@champion: MLflow 2 -> 1"], fixed
    # admin: retry after the cause is gone (API), drop the other (CLI, in-process on the same database)
    proxy.rules.clear()
    r = reg.c.post(
        f"/v1/outbox/{parked[0]['id']}/retry", json={"reason": "MLflow fixed"}, headers=auth(ADMIN)
    )
    assert r.status_code == 200 and r.json()["state"] == "pending", r.text
    assert (
        reg.c.post(f"/v1/outbox/{parked[0]['id']}/retry", json={"reason": "x"}, headers=auth(CI)).status_code
        == 403
    )
    reg.passes(lambda: len(reg.outbox()) == 1)
    assert ml.get_registered_model(alpha).aliases["poison"] == "1"
    settings = reg.c.app.state.settings  # type: ignore[attr-defined]
    for k, v in {"OPRD_DATABASE_URL": settings.database_url, "OPRD_MLFLOW_TRACKING_URI": proxy.url,
                 "OPRD_ARTIFACT_ROOTS": str(settings.artifact_roots[0])}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    cli = typer.Typer()
    outbox_cli.register(cli)
    run = CliRunner().invoke(cli, ["outbox", "list", "--parked", "--json"], catch_exceptions=False)
    assert run.exit_code == 0 and [r["id"] for r in json.loads(run.output)] == [parked[1]["id"]], run.output
    run = CliRunner().invoke(cli, ["outbox", "drop", str(parked[1]["id"]), "--reason", "alias abandoned"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(cli, ["outbox", "drop", str(parked[1]["id"]), "--reason", "again"])
    assert run.exit_code == 4 and "already applied" in run.output, run.output
    h = reg.c.get("/health").json()
    assert h["status"] == "ok" and h["parked_mlflow_writes"] == 0, h
    actions = [(e["action"], e["alias"]) for e in reg.history(alpha)]
    assert ("mlflow_retry", "poison") in actions and ("mlflow_dropped", "doomed") in actions
    assert "doomed" not in ml.get_registered_model(alpha).aliases


def test_a_later_move_of_the_same_alias_supersedes_a_parked_one(request, registry_factory, proxy, mlflow_url):
    alpha = _name(request, "alpha")
    proxy.rules.append(
        lambda m, p, b: (
            (400, "INVALID_PARAMETER_VALUE")
            if b.get("alias") == "canary" and b.get("version") == "1"
            else None
        )
    )
    reg = registry_factory(proxy.url)
    assert reg.gate(alpha).status_code == 200
    assert reg.gate(alpha, promote=False).status_code == 200
    assert reg.promote(alpha, "canary", 1).status_code == 200
    reg.passes(lambda: len(reg.outbox(parked=True)) == 1)
    assert reg.promote(alpha, "canary", 2).status_code == 200
    reg.passes(lambda: not reg.outbox())
    assert reg.outbox() == [] and reg.c.get("/health").json()["status"] == "ok"
    assert MlflowClient(mlflow_url).get_registered_model(alpha).aliases["canary"] == "2"


# ------------------------------------------------------------------------------------------------ D: refused up front
@pytest.mark.parametrize("alias", ["latest", "LATEST", "v3", "V12", "a.b"])
def test_aliases_mlflow_reserves_are_422(client_no_mlflow, make_artifact, alias):
    c = client_no_mlflow
    c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
    r = c.post(
        "/v1/gate",
        json=evidence("student", make_artifact("g"), 0.5),
        headers=auth(CI),
        params={"alias": alias},
    )
    assert r.status_code == 422 and "alias" in r.json()["detail"] and "MLflow" in r.json()["detail"], r.text
    assert c.get("/v1/models/student/versions", headers=auth(READ)).json() == []  # nothing recorded
    assert (
        c.post("/v1/gate", json=evidence("student", make_artifact("g2"), 0.5), headers=auth(CI)).status_code
        == 200
    )
    body = {"version": 1, "expected_revision": 0, "reason": "try it"}
    r = c.post(f"/v1/models/student/aliases/{alias}/promote", json=body, headers=auth(CI))
    assert r.status_code == 422, r.text
    assert "reserved" in r.json()["detail"] or "only contain" in r.json()["detail"], r.text


def test_cli_reserved_alias_is_one_line_exit_2(tmp_path, make_artifact, monkeypatch):
    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    cli = typer.Typer()
    register(cli)
    r = CliRunner().invoke(
        cli, ["promote", "student", "1", "--alias", "latest", "--reason", "why not", "--expect-revision", "0"]
    )
    assert r.exit_code == EXIT_USAGE and "reserved by MLflow" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_models_source_of_a_missing_logged_model(
    registry_factory, mlflow_url, hole, settings_factory, make_artifact
):
    """Refused (422) when MLflow says the LoggedModel does not exist; accepted when MLflow cannot answer in time,
    and then parked by the applier at its first attempt (not retried as an outage)."""
    reg = registry_factory(mlflow_url)
    real = MlflowClient(mlflow_url).create_logged_model("0").model_id
    for model_id, want in (("m-0123456789abcdef0123456789abcdef", 422), (real, 201)):
        body = {"artifact_path": str(make_artifact(f"lm-{want}")), "mlflow_source": f"models:/{model_id}",
                "logged_model_id": model_id}  # fmt: skip
        r = reg.c.post("/v1/models/lm-model/versions", json=body, headers=auth(CI))
        assert r.status_code == want, r.text
        if want == 422:
            assert "LoggedModel" in r.json()["detail"]
    reg.passes(lambda: not reg.outbox())
    assert MlflowClient(mlflow_url).get_model_version("lm-model", "1").source == f"models:/{real}"
    # MLflow unreachable at registration: accepted; the applier re-validates once MLflow answers
    missing = "m-fedcba9876543210fedcba9876543210"
    down = registry_factory(hole.url, mlflow_validate_timeout_s=0.5)
    body = {
        "artifact_path": str(make_artifact("lm-down")),
        "mlflow_source": f"models:/{missing}",
        "logged_model_id": missing,
    }
    assert down.c.post("/v1/models/lm-model/versions", json=body, headers=auth(CI)).status_code == 201
    settings = down.c.app.state.settings  # type: ignore[attr-defined]
    up = registry_factory(mlflow_url, database_url=settings.database_url)
    up.passes(lambda: bool(up.outbox(parked=True)))
    [row] = up.outbox(parked=True)
    assert row["attempts"] == 1 and "LoggedModel" in row["last_error"], row
