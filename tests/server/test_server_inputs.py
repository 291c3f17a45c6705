"""Issue 19 item 5: inputs that used to become a 500 or a hung worker are 422s naming the field, nothing stored.

Real app (TestClient), real SQLite / PostgreSQL registries, real FIFOs, symlinks and ``/dev/zero`` on disk.
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import sqlalchemy as sa
from conftest import ADMIN, CI, POLICY, auth, evidence
from fastapi.testclient import TestClient

from server.app import create_app
from server.orm import Base

HANG_LIMIT_S = 60.0
"""Generous bound that only proves "does not block forever" (the answer takes milliseconds)."""


def _counts(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        out = {
            t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar_one() for t in Base.metadata.tables
        }
    eng.dispose()
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, settings_factory, make_artifact):
    url = request.getfixturevalue("pg_fresh_url") if request.param == "postgresql" else None
    settings = settings_factory(url, mlflow_enabled=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.put("/v1/models/student/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        yield c, settings, make_artifact


def _raw(c: TestClient, method: str, url: str, text: str, token: str):
    """Send ``text`` as the body byte for byte (a JSON ``\\ud800`` escape stays an escape on the wire)."""
    return c.request(
        method, url, content=text.encode(), headers={**auth(token), "content-type": "application/json"}
    )


def test_lone_surrogate_in_any_string_is_a_422_naming_the_field(env):
    c, settings, make_artifact = env
    art = make_artifact("good")
    ev = json.dumps(evidence("student", art, 0.5))
    cases = [  # (method, url, body with a lone surrogate, token, field the 422 must name)
        ("POST", "/v1/gate", ev.replace('"teacher@abc123"', '"teacher\\ud800"'), CI, "lineage.teacher"),
        ("POST", "/v1/gate", ev.replace('"p0"', '"p\\udfff0"', 1), CI, "problem_id"),
        ("POST", "/v1/gate", ev.replace('"mlflow_run_ids": {}', '"mlflow_run_ids": {"\\ud800": "x"}'), CI,
         "lineage.mlflow_run_ids"),
        ("PUT", "/v1/models/student/policy", json.dumps({"spec": POLICY, "reason": "why \\ud800"}).replace(
            "\\\\", "\\"), ADMIN, "reason"),
        ("POST", "/v1/models/student/versions", json.dumps({"artifact_path": str(art) + "\\ud800"}).replace(
            "\\\\", "\\"), CI, "artifact_path"),
    ]  # fmt: skip
    before = _counts(settings.database_url)
    for method, url, body, token, field in cases:
        assert "\\ud" in body  # the escape is on the wire, not an already-replaced character
        r = _raw(c, method, url, body, token)
        assert r.status_code == 422, (field, r.status_code, r.text)
        detail = r.json()["detail"]  # the body is valid UTF-8 JSON
        assert field in json.dumps(detail) and "surrogate" in json.dumps(detail), (field, detail)
        assert "\ud800" not in r.content.decode("utf-8", "surrogatepass")
    assert _counts(settings.database_url) == before


def test_over_long_path_component_is_a_422_naming_the_field(env):
    c, settings, make_artifact = env
    root = settings.artifact_roots[0]
    long_path = str(root / ("a" * 300) / "model")  # NAME_MAX is 255 on Linux filesystems
    before = _counts(settings.database_url)
    r = c.post("/v1/models/student/versions", json={"artifact_path": long_path}, headers=auth(CI))
    assert r.status_code == 422 and "artifact_path" in r.json()["detail"], r.text
    assert str(root) not in r.json()["detail"]  # the message quotes at most the caller's first 64 characters
    body = evidence("student", make_artifact("good"), 0.5) | {"artifact_path": long_path}
    r = c.post("/v1/gate", json=body, headers=auth(CI))
    assert r.status_code == 422 and "artifact_path" in r.json()["detail"], r.text
    assert _counts(settings.database_url) == before


def _register_in_thread(c: TestClient, path: str) -> dict:
    """POST the registration from a worker thread; ``{"r": response}`` once answered, ``{}`` while blocked."""
    out: dict = {}

    def go() -> None:
        out["r"] = c.post("/v1/models/student/versions", json={"artifact_path": path}, headers=auth(CI))

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(HANG_LIMIT_S)
    out["thread"] = t
    return out


def test_fifo_manifest_is_refused_without_blocking(env):
    c, settings, make_artifact = env
    art = make_artifact("fifo")
    (art / "manifest.json").unlink()
    os.mkfifo(art / "manifest.json")  # opening it for reading blocks until a writer appears
    before = _counts(settings.database_url)
    out = _register_in_thread(c, str(art))
    if "r" not in out:  # blocked: unblock the worker so the test run can end, then fail
        os.close(os.open(art / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        out["thread"].join(10)
        pytest.fail(f"registering a FIFO manifest blocked for {HANG_LIMIT_S} s")
    r = out["r"]
    assert r.status_code == 422 and "manifest.json" in r.json()["detail"], r.text
    assert "not a regular file" in r.json()["detail"]
    assert _counts(settings.database_url) == before


def test_manifest_symlinked_to_a_device_or_outside_is_never_read(env, tmp_path):
    c, settings, make_artifact = env
    before = _counts(settings.database_url)
    outside = tmp_path / "outside.json"
    good = make_artifact("real")
    outside.write_bytes((good / "manifest.json").read_bytes())  # a valid manifest, but outside the directory
    for name, target in (("zero", "/dev/zero"), ("outside", str(outside))):
        art = make_artifact(name)
        (art / "manifest.json").unlink()
        (art / "manifest.json").symlink_to(target)
        out = _register_in_thread(c, str(art))
        assert "r" in out, f"{name}: registration did not answer within {HANG_LIMIT_S} s"
        r = out["r"]
        assert r.status_code == 422 and "manifest.json" in r.json()["detail"], (name, r.text)
        assert target not in r.json()["detail"]  # where the link points is not revealed
    big = make_artifact("big")
    with (big / "manifest.json").open("r+b") as f:  # 17 MiB, sparse: over the cap without using the disk
        f.truncate(17 * 1024 * 1024)
    r = c.post("/v1/models/student/versions", json={"artifact_path": str(big)}, headers=auth(CI))
    assert r.status_code == 422 and "larger than" in r.json()["detail"], r.text
    assert _counts(settings.database_url) == before


BAD_POLICY_FIELDS = [  # (dotted key, value, field named in the 422)
    ("bootstrap.seed", -1, "seed"),
    ("bootstrap.seed", 2**64, "seed"),
    ("suites.embedded.min_problems", 10**400, "min_problems"),
    ("suites.embedded.min_problems", 0, "min_problems"),
    ("suites.embedded.min_gap_closed", 1.5, "min_gap_closed"),
    ("suites.embedded.floor", -0.1, "floor"),
    ("bootstrap.confidence", 1.0, "confidence"),
    ("bootstrap.n_resamples", 10**6, "n_resamples"),
    ("device_hours.max", 1e300, "max"),
]


def _with(spec: dict, key: str, value) -> dict:
    spec = json.loads(json.dumps(spec))
    *parents, last = key.split(".")
    node = spec
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


def test_out_of_range_policy_fields_are_refused_and_never_break_a_gate(env):
    c, settings, make_artifact = env
    # a champion, so the next gate runs the paired bootstrap (the seed is used)
    assert (
        c.post("/v1/gate", json=evidence("student", make_artifact("v1"), 0.5), headers=auth(CI)).status_code
        == 200
    )
    before = _counts(settings.database_url)
    for key, value, field in BAD_POLICY_FIELDS:
        r = c.put(
            "/v1/models/student/policy",
            json={"spec": _with(POLICY, key, value), "reason": "out of range"},
            headers=auth(ADMIN),
        )
        assert r.status_code == 422 and field in json.dumps(r.json()["detail"]), (
            key,
            value,
            r.status_code,
            r.text,
        )
    assert _counts(settings.database_url) == before
    # A policy stored before these bounds existed (written straight into the table): the gate is a 409 naming it.
    eng = sa.create_engine(settings.database_url)
    with eng.begin() as conn:
        conn.execute(
            sa.update(Base.metadata.tables["policies"]).values(spec=_with(POLICY, "bootstrap.seed", -1))
        )
    eng.dispose()
    r = c.post("/v1/gate", json=evidence("student", make_artifact("v2"), 0.5, seed=2), headers=auth(CI))
    assert r.status_code == 409 and "bootstrap.seed" in r.json()["detail"], r.text
    assert "policy set" in r.json()["detail"]
