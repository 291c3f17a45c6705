"""Issue 9 (adversarial review): each defect that is about the database and the API alone, as a hostile
client or an unlucky operator would hit it. The MLflow-facing defects (2, 3, 8) are in
``test_server_mlflow_faults.py``."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import sqlalchemy as sa
from conftest import ADMIN, CI, POLICY, READ, auth, evidence, problems
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from server.app import create_app
from server.orm import Base
from server.schemas import (
    EvidenceIn,
    Lineage,
    ProblemResult,
    RegisterVersionIn,
    RetireTeacherIn,
    TokenCreateIn,
)

NAME = "student"


def _counts(url: str) -> dict[str, int]:
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        out = {
            t: conn.execute(sa.text(f'SELECT COUNT(*) FROM "{t}"')).scalar_one() for t in Base.metadata.tables
        }
    eng.dispose()
    return out


@pytest.fixture
def env(settings_factory):
    settings = settings_factory(mlflow_enabled=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        assert r.status_code == 200
        yield c, settings


def _champion(c: TestClient) -> int | None:
    st_ = c.get(f"/v1/models/{NAME}/status", headers=auth(READ)).json()
    return st_["champion"]["version"] if st_["champion"] else None


# ------------------------------------------------------------------------------------------------ defect 1
def test_gate_reverifies_the_registered_bytes_before_moving_the_alias(env, make_artifact, tmp_path):
    """A clean copy of a registered manifest must not promote the version whose stored files were changed."""
    c, _ = env
    assert (
        c.post("/v1/gate", json=evidence(NAME, make_artifact("v1"), 0.5), headers=auth(CI)).status_code == 200
    )
    a2 = make_artifact("v2")
    r = c.post("/v1/gate", json=evidence(NAME, a2, 0.5), headers=auth(CI), params={"promote": "false"})
    assert r.status_code == 200 and r.json()["decision"]["verdict"] == "PROMOTE"
    clean = tmp_path / "artifacts" / "v2-clean-copy"
    shutil.copytree(a2, clean)
    (a2 / "model.safetensors").write_bytes(b"tampered")  # the registered artifact_path now holds other bytes
    r = c.post("/v1/gate", json=evidence(NAME, clean, 0.5), headers=auth(CI), params={"promote": "true"})
    assert r.status_code == 409, r.text
    assert "artifact integrity of v2" in r.json()["detail"] and "model.safetensors" in r.json()["detail"]
    assert _champion(c) == 1
    history = c.get(f"/v1/models/{NAME}/history", headers=auth(READ)).json()
    assert [e["to_version"] for e in history if e["action"] == "promote"] == [1]


# ------------------------------------------------------------------------------------------------ defect 4
INVALID_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize("constant", INVALID_JSON_NUMBERS)
def test_nan_and_infinity_are_422_naming_the_field_and_write_nothing(env, make_artifact, constant):
    c, settings = env
    art = make_artifact("v1")
    before = _counts(settings.database_url)
    spec = json.dumps({**POLICY, "length_tokens": {"max": 1.0}}).replace("1.0", constant)
    r = c.put(
        f"/v1/models/{NAME}/policy",
        content=f'{{"spec": {spec}, "reason": "inf budget"}}',
        headers={**auth(ADMIN), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert "spec.length_tokens.max" in r.json()["detail"] and constant in r.json()["detail"]
    ev = json.dumps(evidence(NAME, art, 0.5)).replace('"mean_length": 20.0', f'"mean_length": {constant}', 1)
    r = c.post("/v1/gate", content=ev, headers={**auth(CI), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "suites.embedded.candidate[0].mean_length" in r.json()["detail"]
    assert _counts(settings.database_url) == before


def test_deeply_nested_json_is_422_and_writes_nothing(env):
    c, settings = env
    before = _counts(settings.database_url)
    deep = '{"spec": ' + "[" * 100_000 + "]" * 100_000 + ', "reason": "deep"}'
    r = c.put(
        f"/v1/models/{NAME}/policy", content=deep, headers={**auth(ADMIN), "content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert "nest" in r.json()["detail"]
    assert _counts(settings.database_url) == before


def test_schemas_refuse_non_finite_floats_even_without_the_body_guard():
    row = {"problem_id": "p", "k": 1, "n_correct": 1, "mean_length": float("inf")}
    with pytest.raises(ValidationError):
        ProblemResult.model_validate(row)


# ------------------------------------------------------------------------------------------------ defect 5
def _max_length(model: type[BaseModel], field: str) -> int | None:
    """The maxLength the request schema publishes for a field (also inside ``anyOf`` for optional fields)."""
    prop = model.model_json_schema()["properties"][field]
    lengths = [p["maxLength"] for p in [prop, *prop.get("anyOf", [])] if "maxLength" in p]
    return min(lengths) if lengths else None


# request field -> the column it is stored in
FIELD_COLUMNS = [
    (RegisterVersionIn, "mlflow_run_id", "model_versions", "run_id"),
    (RegisterVersionIn, "logged_model_id", "model_versions", "logged_model_id"),
    (RegisterVersionIn, "teacher", "model_versions", "teacher"),
    (RegisterVersionIn, "mlflow_source", "model_versions", "mlflow_source"),
    (RegisterVersionIn, "artifact_path", "model_versions", "artifact_path"),
    (EvidenceIn, "model", "registered_models", "name"),
    (EvidenceIn, "mlflow_run_id", "model_versions", "run_id"),
    (EvidenceIn, "logged_model_id", "model_versions", "logged_model_id"),
    (Lineage, "teacher", "model_versions", "teacher"),
    (RetireTeacherIn, "teacher", "model_versions", "teacher"),
    (TokenCreateIn, "name", "api_tokens", "name"),
]


@pytest.mark.parametrize(("model", "field", "table", "column"), FIELD_COLUMNS)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    value=st.one_of(st.sampled_from([16, 32, 64, 65, 128, 129, 256, 257]), st.integers(1, 600)).flatmap(
        lambda n: st.text(alphabet="abcdef0123456789-_", min_size=n, max_size=n)
    )
)
def test_every_value_a_schema_accepts_fits_its_column(model, field, table, column, value):
    """Property: whatever the request schema accepts for a field fits the database column it is stored in."""
    limit = Base.metadata.tables[table].columns[column].type.length  # None = TEXT (unbounded)
    assert _max_length(model, field) is not None, f"{model.__name__}.{field} has no max_length"
    try:
        model.__pydantic_validator__.validate_assignment(model.model_construct(), field, value)
    except ValidationError:
        return
    assert limit is None or len(value) <= limit, f"{model.__name__}.{field} accepts {len(value)} > {limit}"


def _max_length_round_trip(url: str, settings_factory, make_artifact) -> None:
    long_id = "r" * _max_length(RegisterVersionIn, "mlflow_run_id")  # type: ignore[operator]
    body = {
        "artifact_path": str(make_artifact("maxlen")),
        "mlflow_run_id": long_id,
        "logged_model_id": "m" + "0" * (_max_length(RegisterVersionIn, "logged_model_id") - 1),  # type: ignore[operator]
        "teacher": "t" * _max_length(RegisterVersionIn, "teacher"),  # type: ignore[operator]
    }
    name = "n" * 128
    with TestClient(
        create_app(settings_factory(url, mlflow_enabled=False)), raise_server_exceptions=False
    ) as c:
        r = c.post(f"/v1/models/{name}/versions", json=body, headers=auth(CI))
        assert r.status_code == 201, r.text
        got = c.get(f"/v1/models/{name}/versions/1", headers=auth(READ)).json()
    assert (got["run_id"], got["logged_model_id"], got["teacher"]) == (
        body["mlflow_run_id"],
        body["logged_model_id"],
        body["teacher"],
    )


def test_max_length_fields_round_trip_sqlite(settings_factory, make_artifact, tmp_path):
    _max_length_round_trip(f"sqlite:///{tmp_path}/maxlen.db", settings_factory, make_artifact)


@pytest.mark.postgres
def test_max_length_fields_round_trip_postgres(settings_factory, make_artifact, pg_fresh_url):
    _max_length_round_trip(pg_fresh_url, settings_factory, make_artifact)


# ------------------------------------------------------------------------------------------------ defect 6
def test_idempotency_key_is_bound_to_the_query_string(env, make_artifact):
    c, _ = env
    assert (
        c.post("/v1/gate", json=evidence(NAME, make_artifact("v1"), 0.5), headers=auth(CI)).status_code == 200
    )
    body = evidence(NAME, make_artifact("v2"), 0.5)
    h = {**auth(CI), "Idempotency-Key": "gate-v2"}
    r = c.post("/v1/gate", json=body, headers=h, params={"promote": "false"})
    assert r.status_code == 200 and r.json()["promoted"] is None
    r = c.post("/v1/gate", json=body, headers=h, params={"promote": "true", "alias": "canary"})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"], r.text
    r = c.post(
        "/v1/gate", json=body, headers=h, params={"promote": "false"}
    )  # the same request still replays
    assert r.status_code == 200 and r.headers.get("Idempotent-Replayed") == "true"


# ------------------------------------------------------------------------------------------------ defect 7
def test_bootstrap_resamples_are_bounded(env):
    c, _ = env
    spec = {**POLICY, "bootstrap": {"seed": 0, "n_resamples": 50_000}}
    r = c.put(f"/v1/models/{NAME}/policy", json={"spec": spec, "reason": "huge"}, headers=auth(ADMIN))
    assert r.status_code == 422 and "n_resamples" in json.dumps(r.json()["detail"])


def test_problems_per_suite_are_bounded(settings_factory, make_artifact):
    from server.schemas import MAX_PROBLEMS

    settings = settings_factory(mlflow_enabled=False, max_body_bytes=32 << 20)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        ev = evidence(NAME, make_artifact("v1"), 0.5)
        ev["suites"]["embedded"]["candidate"] = problems([0.5] * (MAX_PROBLEMS + 1))
        r = c.post("/v1/gate", json=ev, headers=auth(CI))
        assert r.status_code == 422 and "candidate" in json.dumps(r.json()["detail"])
        assert c.get(f"/v1/models/{NAME}/versions", headers=auth(READ)).json() == []


def test_bootstrap_memory_is_bounded_per_chunk():
    """The bootstrap never materialises resamples x problems at once (the review measured ~0.5 GB)."""
    import tracemalloc

    import numpy as np

    from server.decision import bootstrap_mean_ci

    diffs = np.linspace(-1, 1, 10_000)
    tracemalloc.start()
    bootstrap_mean_ci(diffs, n_resamples=10_000, confidence=0.95, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ defect 9
@pytest.mark.parametrize("pid", ["p\x00", "p\x1b[31m", "p\n1", "p\x7f"])
def test_control_characters_in_problem_id_refused(env, make_artifact, pid):
    c, settings = env
    ev = evidence(NAME, make_artifact("v1"), 0.5)
    ev["suites"]["embedded"]["candidate"][0]["problem_id"] = pid
    before = _counts(settings.database_url)
    r = c.post("/v1/gate", json=ev, headers=auth(CI))
    assert r.status_code == 422 and "problem_id" in json.dumps(r.json()["detail"])
    assert _counts(settings.database_url) == before


@pytest.mark.parametrize("run_id", ["../..", "../../etc/passwd", "a/b", "%2e%2e", ".."])
def test_path_like_lineage_run_ids_refused(env, make_artifact, run_id):
    c, _ = env
    ev = evidence(NAME, make_artifact("v1"), 0.5)
    ev["lineage"]["mlflow_run_ids"] = {"distill": run_id}
    r = c.post("/v1/gate", json=ev, headers=auth(CI))
    assert r.status_code == 422 and "mlflow_run_ids" in json.dumps(r.json()["detail"])
    ev = {**evidence(NAME, make_artifact("v1b"), 0.5), "mlflow_run_id": run_id}
    assert c.post("/v1/gate", json=ev, headers=auth(CI)).status_code == 422


def test_422_details_do_not_reveal_resolved_server_paths(env, tmp_path):
    c, _ = env
    outside = tmp_path / "secret-outside"
    outside.mkdir()
    link = tmp_path / "artifacts" / "innocent"
    link.symlink_to(outside)
    for raw in (str(link), "relative-missing-dir", str(tmp_path / "artifacts" / "missing")):
        r = c.post(f"/v1/models/{NAME}/versions", json={"artifact_path": raw}, headers=auth(CI))
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert str(outside) not in detail and os.getcwd() not in detail, detail
        assert str(tmp_path / "artifacts") not in detail.replace(raw, ""), detail


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc"])
def test_api_docs_need_a_token_when_tokens_are_configured(settings_factory, path):
    with TestClient(create_app(settings_factory(mlflow_enabled=False))) as c:
        assert c.get(path).status_code == 401
        assert c.get(path, headers=auth(READ)).status_code == 200
    with TestClient(create_app(settings_factory(mlflow_enabled=False, public_docs=True))) as c:
        assert c.get(path).status_code == 200


def test_re_registering_a_manifest_with_another_source_or_run_id_is_409(env, make_artifact):
    c, _ = env
    art = make_artifact("v1")
    run_a, run_b = "a" * 32, "b" * 32
    body = {"artifact_path": str(art), "mlflow_run_id": run_a}
    assert c.post(f"/v1/models/{NAME}/versions", json=body, headers=auth(CI)).status_code == 201
    r = c.post(
        f"/v1/models/{NAME}/versions", json=body, headers=auth(CI)
    )  # same content, same links: idempotent
    assert r.status_code == 201 and r.json()["version"] == 1
    r = c.post(f"/v1/models/{NAME}/versions", json={**body, "mlflow_run_id": run_b}, headers=auth(CI))
    assert r.status_code == 409 and "mlflow_run_id" in r.json()["detail"], r.text
    r = c.post(
        f"/v1/models/{NAME}/versions",
        json={**body, "mlflow_source": f"runs:/{run_a}/model"},
        headers=auth(CI),
    )
    assert r.status_code == 409 and "mlflow_source" in r.json()["detail"], r.text
    ev = {**evidence(NAME, art, 0.5), "mlflow_run_id": run_b}
    assert c.post("/v1/gate", json=ev, headers=auth(CI)).status_code == 409
    assert len(c.get(f"/v1/models/{NAME}/versions", headers=auth(READ)).json()) == 1


# ------------------------------------------------------------------------------------------------ latency
def test_a_mutation_that_does_not_wait_for_mlflow_says_so(settings_factory, make_artifact):
    """With nobody applying the outbox, a move answers at once and marks MLflow as pending; a gate that writes
    nothing for MLflow does not wait and is not marked."""
    app = create_app(settings_factory(sync_wait_s=0.05), run_reconciler=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.put(f"/v1/models/{NAME}/policy", json={"spec": POLICY, "reason": "setup"}, headers=auth(ADMIN))
        ev = evidence(NAME, make_artifact("v1"), 0.5)
        r = c.post("/v1/gate", json=ev, headers=auth(CI))
        assert r.status_code == 200 and r.headers.get("OPRD-MLflow") == "pending"
        app.state.reconciler.run_once()
        r = c.post("/v1/gate", json=ev, headers=auth(CI), params={"promote": "false"})
        assert r.status_code == 200 and "OPRD-MLflow" not in r.headers


def test_a_decision_planned_before_the_transaction_is_redone_when_the_policy_changed(env, make_artifact):
    """The gate decides outside the write transaction; the transaction re-checks the policy version (and the
    champion) and decides again under the lock when they moved, so no decision cites a superseded policy."""
    from server.auth import Principal
    from server.gating import plan_decision, submit_evidence
    from server.orm import ModelVersion, Policy, RegisteredModel
    from server.schemas import EvidenceBody

    c, _ = env
    assert (
        c.post("/v1/gate", json=evidence(NAME, make_artifact("v1"), 0.5), headers=auth(CI)).status_code == 200
    )
    ev = evidence(NAME, make_artifact("v2"), 0.5)
    assert c.post("/v1/gate", json=ev, headers=auth(CI), params={"promote": "false"}).status_code == 200
    body = EvidenceBody(suites=ev["suites"], cost=ev["cost"], lineage=ev["lineage"])
    db = c.app.state.db
    with db.read() as s:
        model = s.scalar(sa.select(RegisteredModel).where(RegisteredModel.name == NAME))
        plan = plan_decision(s, model, 2, body, "champion")
    assert plan.verdict == "PROMOTE"
    strict = {**POLICY, "suites": {"embedded": {**POLICY["suites"]["embedded"], "floor": 0.99}}}
    r = c.put(f"/v1/models/{NAME}/policy", json={"spec": strict, "reason": "stricter"}, headers=auth(ADMIN))
    assert r.status_code == 200

    def tx(s):  # type: ignore[no-untyped-def]
        m = s.scalar(sa.select(RegisteredModel).where(RegisteredModel.name == NAME).with_for_update())
        mv = s.scalar(sa.select(ModelVersion).where(ModelVersion.model_id == m.id, ModelVersion.version == 2))
        d = submit_evidence(
            s, Principal("t", "ci"), m, mv, body, alias="champion", auto_rollback=False, plan=plan
        )
        return d.verdict, s.get(Policy, d.policy_id).version

    assert db.transact(tx) == ("REJECT", 2)
