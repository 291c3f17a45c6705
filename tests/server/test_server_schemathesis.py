"""S-API1: property-based requests over every operation of the OpenAPI schema; no input may cause a 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from conftest import ADMIN, POLICY, auth, evidence
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.loadtest import write_artifact
from server.settings import ServerSettings

_tmp = Path(tempfile.mkdtemp(prefix="oprd-st-"))
_app = create_app(
    ServerSettings(
        database_url=f"sqlite:///{_tmp}/registry.db",
        mlflow_enabled=False,
        artifact_roots=[_tmp],
        admin_token=ADMIN,
        max_body_bytes=256 * 1024,
        public_docs=True,  # the schema is read without a token below
    )
)
with TestClient(_app) as _c:  # a model with a policy, two versions and a champion, so paths can resolve
    _r = _c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
    assert _r.status_code in (200, 201), f"setup: policy not stored: {_r.status_code} {_r.text}"
    for _v in (1, 2):
        _r = _c.post(
            "/v1/gate", json=evidence("student", write_artifact(_tmp, f"v{_v}"), 0.5), headers=auth(ADMIN)
        )
        assert _r.status_code in (200, 201), f"setup: version {_v} not gated: {_r.status_code} {_r.text}"
        assert _r.json()["version"]["version"] == _v and _r.json()["decision"]["verdict"] == "PROMOTE", (
            _r.text
        )
    # the state the generated requests are meant to reach: two versions, the second one champion
    _r = _c.get("/v1/models/student/status", headers=auth(ADMIN))
    assert _r.status_code == 200 and _r.json()["champion"]["version"] == 2, f"setup: no champion: {_r.text}"

schema = schemathesis.openapi.from_asgi("/openapi.json", _app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_with_admin_token(case):
    response = case.call(headers=auth(ADMIN))
    case.validate_response(response, checks=[not_a_server_error])
