"""Cost over time: the median-of-last-K drift criteria catch a cost creep that every per-step ratio lets through,
and ``history --cost`` (route and CLI) shows per version accuracy, tokens, cost, $/point and what was flagged."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import ADMIN, CI, POLICY, auth, evidence, problems, server_env
from typer.testing import CliRunner

from oprd_ci.registry_cli import register
from server.decision import decide
from server.drift import PromotedValues
from server.policy import PolicySpec, policy_digest
from server.schemas import EvidenceBody

STEP = 1.15
"""Each candidate costs 15% more than the one before: under the 1.5x per-step cap to the champion."""
DRIFT_POLICY = {**POLICY, "cost_usd": {"max_ratio_to_champion": 1.5, "max_ratio_to_recent_median": 1.3}}


def _gate_sequence(c, name: str, spec: dict, n: int, make_artifact) -> list[dict]:
    r = c.put(f"/v1/models/{name}/policy", json={"spec": spec, "reason": "cost drift"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    out = []
    for i in range(n):
        ev = evidence(name, make_artifact(f"{name}-v{i + 1}"), 0.5, seed=1, usd=STEP**i)
        r = c.post("/v1/gate", json=ev, headers=auth(CI))
        assert r.status_code == 200, r.text
        out.append(r.json()["decision"])
    return out


def _row(decision: dict, criterion: str) -> dict:
    return next(c for c in decision["criteria"] if c["criterion"] == criterion)


def test_slow_cost_drift_fails_the_recent_median_and_passes_without_it(client_no_mlflow, make_artifact):
    """+15% per promotion: the per-step ratio (1.15 <= 1.5) passes every time; the median of the promoted ones
    (v1..v3 = 1, 1.15, 1.3225; median 1.15) makes v4 (1.521) 1.32x > 1.3: REJECT. Without the criterion v4
    promotes."""
    c = client_no_mlflow
    with_drift = _gate_sequence(c, "drifty", DRIFT_POLICY, 4, make_artifact)
    assert [d["verdict"] for d in with_drift] == ["PROMOTE", "PROMOTE", "PROMOTE", "REJECT"]
    statuses = [_row(d, "cost_usd_recent_median")["status"] for d in with_drift]
    assert statuses == ["NOT_APPLICABLE", "NOT_APPLICABLE", "PASS", "FAIL"]  # n/a below 2 promoted versions
    assert all(_row(d, "cost_usd_ratio")["status"] in ("PASS", "NOT_APPLICABLE") for d in with_drift)
    v3, v4 = _row(with_drift[2], "cost_usd_recent_median"), _row(with_drift[3], "cost_usd_recent_median")
    assert v3["observed"] == pytest.approx(STEP**2 / ((1 + STEP) / 2))
    assert v4["observed"] == pytest.approx(STEP**3 / STEP) and "(v3,v2,v1)" in v4["detail"]
    without = _gate_sequence(c, "plain", POLICY, 4, make_artifact)
    assert [d["verdict"] for d in without] == ["PROMOTE"] * 4
    assert not any(c["criterion"].endswith("_recent_median") for d in without for c in d["criteria"])


def test_recent_median_uses_the_last_k_and_lengths_too():
    """recent_k bounds the window (newest first); length_tokens has the same criterion; a missing candidate
    cost fails closed."""
    spec = PolicySpec.model_validate(
        {
            "suites": {"embedded": {"min_problems": 1}},
            "length_tokens": {"max_ratio_to_recent_median": 1.2, "recent_k": 2},
            "cost_usd": {"max_ratio_to_recent_median": 2.0, "recent_k": 3},
        }
    )
    ev = EvidenceBody.model_validate(
        {
            "suites": {"embedded": {"candidate": problems([1.0] * 4, length=30.0)}},
            "cost": {"device_hours": 1, "usd": 4.0},
        }
    )
    recent = [
        PromotedValues(5, 2.0, 1.0, 26.0),
        PromotedValues(4, 1.0, 1.0, 24.0),
        PromotedValues(3, 1.5, 1.0, 1.0),
    ]
    recent += [PromotedValues(2, 100.0, 1.0, 1.0)]  # beyond both windows
    verdict, rows = decide(spec, ev, None, recent)
    by = {r.criterion: r for r in rows}
    assert by["length_tokens_recent_median"].observed == pytest.approx(30.0 / 25.0)  # median(26, 24)
    assert by["length_tokens_recent_median"].status == "PASS"
    assert by["cost_usd_recent_median"].observed == pytest.approx(4.0 / 1.5)  # median(2, 1, 1.5)
    assert by["cost_usd_recent_median"].status == "FAIL" and verdict == "REJECT"
    no_cost = EvidenceBody.model_validate({"suites": ev.model_dump()["suites"]})
    assert {r.criterion: r.status for r in decide(spec, no_cost, None, recent)[1]}[
        "cost_usd_recent_median"
    ] == "FAIL"


def test_policies_without_the_new_keys_keep_their_digest():
    """The canonical form leaves the added keys out at their defaults, so digests recorded before they existed
    (here: policies/default.yaml as computed on main before this change) stay valid; setting them changes it."""
    from server.policy import load_policy_file

    spec = load_policy_file("policies/default.yaml")
    assert policy_digest(spec) == "sha256:e6907bf2f4a69f75fcdf42897527c6bf3c9af6a0d4949d0962c0eaa4059516ee"
    explicit = spec.model_copy(update={"cost_usd": spec.cost_usd.model_copy(update={"recent_k": 5})})
    assert policy_digest(explicit) == policy_digest(spec)
    assert policy_digest(PolicySpec.model_validate(POLICY)) != policy_digest(
        PolicySpec.model_validate(DRIFT_POLICY)
    )


def test_history_cost_route_and_cli(client_no_mlflow, make_artifact, tmp_path, monkeypatch):
    c = client_no_mlflow
    _gate_sequence(c, "drifty", DRIFT_POLICY, 4, make_artifact)
    r = c.get("/v1/models/drifty/cost-history", headers=auth(CI))
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [(x["version"], x["status"]) for x in rows] == [
        (1, "promoted"), (2, "promoted"), (3, "champion"), (4, "rejected")
    ]  # fmt: skip
    assert [x["usd"] for x in rows] == pytest.approx([STEP**i for i in range(4)])
    assert rows[3]["flagged"] == ["cost_usd_recent_median"] and rows[2]["flagged"] == []
    acc = rows[0]["accuracy"]["embedded"]
    assert 0 < acc < 1 and rows[0]["usd_per_point"] == pytest.approx(1.0 / (100 * acc))
    assert rows[0]["tokens_per_response"] == pytest.approx(20.0) and rows[0]["device_hours"] == 0.5
    assert c.get("/v1/models/nobody/cost-history", headers=auth(CI)).status_code == 404

    for k, v in server_env(tmp_path, OPRD_MLFLOW_ENABLED="false").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("OPRD_REGISTRY_URL", raising=False)
    app = typer.Typer()
    register(app)
    out = CliRunner().invoke(app, ["history", "drifty", "--cost", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == rows
    table = CliRunner().invoke(app, ["history", "drifty", "--cost"], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert (
        "cost_usd_recent_median" in table.output
        and "embedded %" in table.output
        and "champion" in table.output
    )
    audit = CliRunner().invoke(app, ["history", "drifty", "--json"], catch_exceptions=False)
    assert "promote" in {e["action"] for e in json.loads(audit.output)}  # without --cost: the audit log
