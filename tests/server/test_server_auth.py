"""S-API2: the authorization matrix is generated from the app's route table and fails closed."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from conftest import ADMIN, READ, auth
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.app import create_app, iter_api_routes
from server.auth import ACCESS_RULES, PUBLIC, ROLE_RANK
from server.orm import Base

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def _api_routes(app) -> list[APIRoute]:
    routes = list(iter_api_routes(app.routes))
    assert routes, "no API routes found: the route walk is broken"
    return routes


def _concrete(path: str) -> str:
    return re.sub(
        r"\{(\w+)\}", lambda m: "1" if m.group(1) in ("version", "decision_id") else "student", path
    )


def _row_counts(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        counts = {
            t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar_one() for t in Base.metadata.tables
        }
    eng.dispose()
    return counts


def test_every_route_has_a_rule_and_mutations_need_ci(settings_factory):
    """Fails when a route is added without an entry in ACCESS_RULES (or a mutating route is left public)."""
    app = create_app(settings_factory(mlflow_enabled=False))
    routes = _api_routes(app)
    names = {r.name for r in routes}
    assert names == set(ACCESS_RULES), (
        f"missing rules: {names - set(ACCESS_RULES)}, stale rules: {set(ACCESS_RULES) - names}"
    )
    for r in routes:
        rule = ACCESS_RULES[r.name]
        if r.methods & MUTATING:
            assert rule != PUBLIC and ROLE_RANK[rule] >= ROLE_RANK["ci"], (
                f"{r.name} ({r.path}) is mutating but needs only {rule}"
            )


def test_unruled_route_is_refused_at_run_time(settings_factory):
    app = create_app(settings_factory(mlflow_enabled=False))

    @app.post("/v1/forgotten", name="forgotten")
    def forgotten() -> dict:
        return {"wrote": True}

    with TestClient(app) as c:
        r = c.post("/v1/forgotten", headers=auth(ADMIN))
    assert r.status_code == 403 and "no access rule" in r.json()["detail"]


def test_mutating_routes_reject_missing_bad_and_low_tokens_without_writing(settings_factory):
    settings = settings_factory(mlflow_enabled=False)
    app = create_app(settings)
    with TestClient(app) as c:
        before = _row_counts(settings.database_url)
        checked = 0
        for r in _api_routes(app):
            methods = r.methods & MUTATING
            if not methods:
                continue
            method, path = methods.pop(), _concrete(r.path)
            for headers in (
                {},
                {"Authorization": "Basic abc"},
                {"Authorization": "Bearer"},
                auth("not-a-token"),
            ):
                resp = c.request(method, path, json={}, headers=headers)
                assert resp.status_code == 401, (r.name, headers, resp.status_code)
                assert resp.headers["www-authenticate"] == "Bearer"
            resp = c.request(method, path, json={}, headers=auth(READ))
            assert resp.status_code == 403, (r.name, resp.status_code)
            checked += 1
        assert checked >= 9
        assert _row_counts(settings.database_url) == before


@pytest.mark.parametrize("name", sorted(n for n, rule in ACCESS_RULES.items() if rule == "read"))
def test_read_routes_need_a_token(settings_factory, name):
    app = create_app(settings_factory(mlflow_enabled=False))
    route = next(r for r in _api_routes(app) if r.name == name)
    with TestClient(app) as c:
        assert c.get(_concrete(route.path)).status_code == 401


def test_tokens_are_stored_hashed(settings_factory):
    settings = settings_factory(mlflow_enabled=False)
    with TestClient(create_app(settings)) as c:
        r = c.post("/v1/tokens", json={"name": "bot", "role": "ci"}, headers=auth(ADMIN))
        assert r.status_code == 201
        secret = r.json()["token"]
        assert c.get("/v1/models", headers=auth(secret)).status_code == 200
    eng = sa.create_engine(settings.database_url)
    with eng.connect() as conn:
        stored = conn.execute(sa.text("SELECT token_sha256 FROM api_tokens")).scalars().all()
    eng.dispose()
    assert secret not in stored and ADMIN not in stored and len(stored) == 4
