"""The failure-bank criterion ``min_fixed_fraction``: "fixes N of M failures of v<champion>" (hand-computed
cases on the pure decision engine, then through the HTTP API on a real SQLite registry)."""

from __future__ import annotations

import pytest
from conftest import ADMIN, CI, POLICY, auth, evidence, problems

from server.decision import ChampionEvidence, decide
from server.policy import PolicySpec
from server.schemas import EvidenceBody

SUITE = "prod"
RULE = {"min_fixed_fraction": 0.5, "fixed_min_avg_at_k": 0.5}


def _policy(**rule) -> PolicySpec:
    return PolicySpec.model_validate({"suites": {SUITE: {**RULE, **rule}}})


def _ev(scores: list[float], recorded: dict[str, list[str]] | None) -> EvidenceBody:
    suite = {"candidate": problems(scores)}
    if recorded is not None:
        suite["recorded_failures"] = recorded
    return EvidenceBody.model_validate({"suites": {SUITE: suite}})


def _crit(rows):
    return next(r for r in rows if r.criterion == "fixed_failures")


CHAMP = ChampionEvidence(version=3, suites={}, cost=None)
# k=4: p0 4/4, p1 2/4 (= 0.5: fixed at the default threshold), p2 1/4, p3 0/4, p4 4/4
SCORES = [1.0, 0.5, 0.25, 0.0, 1.0]


def test_counts_only_the_champions_failures_and_the_avg_threshold():
    # v3 failed p0..p3 (M = 4); p0 (1.0) and p1 (0.5) are fixed, p2 (0.25) and p3 (0) are not: N = 2.
    # p4 was a failure of v2, not of the champion: it does not count.
    verdict, rows = decide(_policy(), _ev(SCORES, {"3": ["p0", "p1", "p2", "p3"], "2": ["p4"]}), CHAMP)
    c = _crit(rows)
    assert (c.status, c.observed, c.threshold) == ("PASS", 0.5, 0.5)
    assert c.detail.startswith("fixes 2 of 4 failures of v3")
    assert verdict == "PROMOTE"


def test_below_the_share_fails_and_rejects():
    verdict, rows = decide(
        _policy(min_fixed_fraction=0.75), _ev(SCORES, {"3": ["p0", "p1", "p2", "p3"]}), CHAMP
    )
    c = _crit(rows)
    assert c.status == "FAIL" and c.observed == 0.5 and "fixes 2 of 4 failures of v3" in c.detail
    assert verdict == "REJECT"


def test_stricter_fixed_threshold_counts_fewer():
    # fixed = Avg@k >= 0.75: only p0 of p0..p3 -> 1 of 4 = 0.25 < 0.5
    _, rows = decide(_policy(fixed_min_avg_at_k=0.75), _ev(SCORES, {"3": ["p0", "p1", "p2", "p3"]}), CHAMP)
    c = _crit(rows)
    assert c.status == "FAIL" and c.detail.startswith("fixes 1 of 4 failures of v3")


def test_recorded_failure_missing_from_candidate_counts_unfixed():
    _, rows = decide(_policy(), _ev(SCORES, {"3": ["p0", "zz"]}), CHAMP)
    c = _crit(rows)
    assert c.status == "PASS" and c.detail.startswith("fixes 1 of 2 failures of v3")
    assert "1 not in the candidate's results" in c.detail


def test_no_champion_none_on_record_and_no_record():
    assert _crit(decide(_policy(), _ev(SCORES, {"3": ["p0"]}), None)[1]).status == "NOT_APPLICABLE"
    c = _crit(decide(_policy(), _ev(SCORES, {"2": ["p0"]}), CHAMP)[1])
    assert c.status == "NOT_APPLICABLE" and "fixes 0 of 0 failures of v3" in c.detail
    c = _crit(decide(_policy(), _ev(SCORES, None), CHAMP)[1])  # policy asks, evidence silent: fail closed
    assert c.status == "FAIL" and "recorded_failures" in c.detail


def test_policy_without_the_rule_has_no_such_criterion():
    rows = decide(
        PolicySpec.model_validate({"suites": {SUITE: {"floor": 0.1}}}), _ev(SCORES, {"3": ["p3"]}), CHAMP
    )[1]
    assert not [r for r in rows if r.criterion == "fixed_failures"]


def test_bad_recorded_failures_are_rejected_by_the_schema():
    with pytest.raises(ValueError, match="recorded_failures"):
        _ev(SCORES, {"v3": ["p0"]})


def test_through_the_api_fixes_n_of_m_failures_of_the_champion(client_no_mlflow, make_artifact):
    """v1 is promoted (first version: NOT_APPLICABLE); v2's evidence records which regression problems v1 failed;
    the registry decides against the champion it holds (v1) and says "fixes N of M failures of v1"."""
    c = client_no_mlflow
    policy = {**POLICY, "suites": {**POLICY["suites"], SUITE: {"min_fixed_fraction": 0.6}}}
    r = c.put("/v1/models/m/policy", json={"spec": policy, "reason": "with failures"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text

    def gate(name: str, reg_scores: list[float], recorded: dict[str, list[str]]) -> dict:
        ev = evidence("m", make_artifact(name), 0.6, seed=1)
        ev["suites"][SUITE] = {"candidate": problems(reg_scores, prefix="f"), "recorded_failures": recorded}
        r = c.post("/v1/gate", json=ev, headers=auth(CI))
        assert r.status_code == 200, r.text
        return r.json()["decision"]

    d1 = gate("v1", [0.0, 0.0, 0.0], {})
    assert d1["verdict"] == "PROMOTE"
    assert next(x for x in d1["criteria"] if x["criterion"] == "fixed_failures")["status"] == "NOT_APPLICABLE"
    # 3 failures of v1 on record: f0 and f1 solved (2 of 3 = 0.67 >= 0.6) -> PASS
    d2 = gate("v2", [1.0, 0.75, 0.0], {"1": ["f0", "f1", "f2"]})
    crit = next(x for x in d2["criteria"] if x["criterion"] == "fixed_failures")
    assert crit["status"] == "PASS" and crit["detail"].startswith("fixes 2 of 3 failures of v1")
    assert d2["champion_version"] == 1
