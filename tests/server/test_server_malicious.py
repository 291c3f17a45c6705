"""S-API3 / R6: malicious inputs get a 4xx that names the field, and nothing is written."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from conftest import ADMIN, CI, POLICY, auth, evidence
from fastapi.testclient import TestClient

from server.app import create_app
from server.orm import Base

BAD_NAMES = [
    "../../etc/passwd",
    "..%2f",
    "%252e%252e%252f",
    "..\\x",
    "//proc/self/root",
    "a#/../b",
    "a?x=../",
    "' OR 1=1--",
    "; DROP TABLE aliases",
    "a\x00b",
    "champ\u202eion",
    "chаmpion",
    "a" * 200,
]
BAD_URIS = [
    "file:///etc",
    "http://169.254.169.254/latest",
    "http://127.0.0.1:5000/",
    "s3://other-bucket/model",
    "/etc",
    "../artifacts",
    "//proc/self/root",
    "/tmp/%2e%2e/etc",
]
BAD_VERSIONS = [-1, 0, 2**63, "1e3", True, 1.5, None]


def _counts(url):
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        out = {
            t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar_one() for t in Base.metadata.tables
        }
    eng.dispose()
    return out


@pytest.fixture
def env(settings_factory, make_artifact):
    settings = settings_factory(mlflow_enabled=False, max_body_bytes=64 * 1024)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert (
            c.put(
                "/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN)
            ).status_code
            == 200
        )
        good = make_artifact("good")
        assert c.post("/v1/gate", json=evidence("student", good, 0.5), headers=auth(CI)).status_code == 200
        yield c, settings, good


def _detail(r) -> str:
    return json.dumps(r.json()["detail"])


def test_bad_names_refused(env):
    c, settings, good = env
    before = _counts(settings.database_url)
    for name in BAD_NAMES:
        r = c.post("/v1/gate", json=evidence(name, good, 0.5), headers=auth(CI))
        assert r.status_code == 422 and "model" in _detail(r), (name, r.status_code)
        # in the path (percent-encoded): no route (404) or a pattern failure (422), never a state conflict
        quoted = quote(name, safe="")
        r = c.post(
            f"/v1/models/{quoted}/aliases/champion/promote",
            json={"version": 1, "expected_revision": 1, "reason": "attack"},
            headers=auth(CI),
        )
        assert r.status_code in (404, 422), (name, r.status_code)
        if r.status_code == 422:
            assert "name" in _detail(r)
        r = c.post(
            f"/v1/models/student/aliases/{quoted}/promote",
            json={"version": 1, "expected_revision": 1, "reason": "attack"},
            headers=auth(CI),
        )
        assert r.status_code in (404, 422), (name, r.status_code)
    assert _counts(settings.database_url) == before
    assert c.get("/v1/models", headers=auth(ADMIN)).json() == ["student"]  # the tables still exist


def test_bad_artifact_uris_refused(env):
    c, settings, _ = env
    before = _counts(settings.database_url)
    for uri in BAD_URIS:
        r = c.post("/v1/models/student/versions", json={"artifact_path": uri}, headers=auth(CI))
        assert r.status_code == 422 and "artifact_path" in _detail(r), (uri, r.text)
    for src in ["http://169.254.169.254/", "file:///etc/passwd", "s3://bucket/x"]:
        r = c.post(
            "/v1/models/student/versions",
            json={"artifact_path": str(env[2]), "mlflow_source": src},
            headers=auth(CI),
        )
        assert r.status_code == 422 and "mlflow_source" in _detail(r), src
    assert _counts(settings.database_url) == before


def test_extra_fields_and_bad_versions_refused(env):
    c, settings, _ = env
    before = _counts(settings.database_url)
    body = {
        "version": 1,
        "expected_revision": 1,
        "reason": "sneaky",
        "approved": True,
        "actor": "admin",
        "audit_seq": 1,
    }
    r = c.post("/v1/models/student/aliases/champion/promote", json=body, headers=auth(CI))
    assert r.status_code == 422 and "extra_forbidden" in _detail(r) and "actor" in _detail(r)
    for v in BAD_VERSIONS:
        r = c.post(
            "/v1/models/student/aliases/champion/promote",
            json={"version": v, "expected_revision": 1, "reason": "bad version"},
            headers=auth(CI),
        )
        assert r.status_code == 422 and "version" in _detail(r), v
    for v in ["-1", "0", str(2**63), "abc"]:
        r = c.post(
            f"/v1/models/student/versions/{v}/retire", json={"reason": "bad version"}, headers=auth(ADMIN)
        )
        assert r.status_code == 422 and "version" in _detail(r), v
    assert _counts(settings.database_url) == before


def test_body_limits_content_type_and_duplicate_keys(env):
    c, settings, _ = env
    before = _counts(settings.database_url)
    big = {"version": 1, "expected_revision": 1, "reason": "x" * (70 * 1024)}
    r = c.post("/v1/models/student/aliases/champion/promote", json=big, headers=auth(CI))
    assert r.status_code == 413 and "body" in r.json()["detail"]
    r = c.post(
        "/v1/models/student/aliases/champion/promote",
        content=b"version=1",
        headers={**auth(CI), "Content-Type": "text/plain"},
    )
    assert r.status_code == 415 and "content-type" in r.json()["detail"]
    dup = b'{"version": 1, "expected_revision": 1, "reason": "dup keys", "override": false, "override": true}'
    r = c.post(
        "/v1/models/student/aliases/champion/promote",
        content=dup,
        headers={**auth(ADMIN), "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "override" in r.json()["detail"]
    r = c.post(
        "/v1/models/student/aliases/champion/promote",
        json={"version": 1, "expected_revision": 1, "reason": "fine reason"},
        headers={**auth(CI), "Idempotency-Key": "../../x"},
    )
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]
    assert _counts(settings.database_url) == before


@pytest.mark.parametrize(
    "mutate",
    ["flip_byte", "delete_file", "add_pickle", "add_unlisted", "edit_manifest", "symlink_out"],
)
def test_tampered_artifacts_refused_at_registration(env, make_artifact, tmp_path, mutate):
    """R6: each mutation of a good artifact is refused with a reason, and nothing is written."""
    c, settings, _ = env
    a = make_artifact(f"t-{mutate}")
    manifest = json.loads((a / "manifest.json").read_text())
    if mutate == "flip_byte":
        data = bytearray((a / "model.safetensors").read_bytes())
        data[10] ^= 1
        (a / "model.safetensors").write_bytes(bytes(data))
    elif mutate == "delete_file":
        (a / "config.json").unlink()
    elif mutate == "add_pickle":
        (a / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif mutate == "add_unlisted":
        (a / "extra.txt").write_text("x")
    elif mutate == "edit_manifest":
        manifest["files"]["config.json"] = "0" * 64
        (a / "manifest.json").write_text(json.dumps(manifest))
    elif mutate == "symlink_out":
        (a / "config.json").unlink()
        (tmp_path / "outside.json").write_bytes(b'{"hidden_size": 8}')
        (a / "config.json").symlink_to(tmp_path / "outside.json")
    before = _counts(settings.database_url)
    r = c.post("/v1/models/student/versions", json={"artifact_path": str(a)}, headers=auth(CI))
    assert r.status_code == 422 and r.json()["detail"].startswith("artifact"), r.text
    assert _counts(settings.database_url) == before
