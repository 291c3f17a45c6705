"""The decision engine: verdict rules, fail-closed metrics, budgets, and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import problems

from server.decision import ChampionEvidence, bootstrap_mean_ci, decide
from server.policy import PolicySpec, load_policy_file
from server.schemas import Cost, EvidenceBody, ProblemResult

POLICY = PolicySpec.model_validate(
    {
        "suites": {
            "embedded": {
                "floor": 0.3,
                "non_inferiority_margin": 0.05,
                "max_teacher_gap": 0.5,
                "min_problems": 50,
            }
        },
        "length_tokens": {"max": 64, "max_ratio_to_champion": 1.5},
        "cost_usd": {"max": 10, "max_ratio_to_champion": 1.5},
        "bootstrap": {"seed": 3, "n_resamples": 1000},
    }
)


def _ev(scores, teacher=0.9, length=20.0, usd=1.0, suite="embedded") -> EvidenceBody:
    return EvidenceBody.model_validate(
        {
            "suites": {
                suite: {
                    "candidate": problems(scores, length=length),
                    "teacher": problems([teacher] * len(scores)),
                }
            },
            "cost": {"device_hours": 1.0, "usd": usd},
        }
    )


def _champ(scores, length=20.0, usd=1.0) -> ChampionEvidence:
    rows = [ProblemResult.model_validate(p) for p in problems(scores, length=length)]
    return ChampionEvidence(version=1, suites={"embedded": rows}, cost=Cost(device_hours=1.0, usd=usd))


def _status(rows, name, suite="embedded"):
    return next(r.status for r in rows if r.criterion == name and r.suite in (suite, None))


BASE = [1.0, 0.75, 0.5, 0.25, 0.0] * 20  # 100 problems, mean 0.5


def test_first_version_without_champion_promotes_with_champion_criteria_not_applicable():
    verdict, rows = decide(POLICY, _ev(BASE), None)
    assert verdict == "PROMOTE"
    assert _status(rows, "non_inferiority") == "NOT_APPLICABLE"
    assert (
        _status(rows, "length_tokens_ratio") == "NOT_APPLICABLE"
        and _status(rows, "cost_usd_ratio") == "NOT_APPLICABLE"
    )


def test_equal_candidate_is_non_inferior_and_clear_regression_fails():
    assert decide(POLICY, _ev(BASE), _champ(BASE))[0] == "PROMOTE"
    worse = [max(0.0, s - 0.25) for s in BASE]
    verdict, rows = decide(POLICY, _ev(worse), _champ(BASE))
    assert verdict == "REJECT" and _status(rows, "non_inferiority") == "FAIL"
    nonInf = next(r for r in rows if r.criterion == "non_inferiority")
    assert nonInf.observed < -0.05 and "100 problems" in nonInf.detail


def test_noisy_small_difference_is_inconclusive():
    rng = np.random.default_rng(0)
    champ = list(rng.integers(0, 5, 100) / 4)
    cand = [
        min(1.0, max(0.0, c + d))
        for c, d in zip(champ, rng.choice([-0.5, 0.0, 0.5], 100, p=[0.3, 0.45, 0.25]), strict=True)
    ]
    verdict, rows = decide(POLICY, _ev(cand), _champ(champ))
    assert _status(rows, "non_inferiority") == "INCONCLUSIVE" and verdict == "INCONCLUSIVE"


def test_too_few_problems_is_inconclusive_not_promote():
    verdict, rows = decide(POLICY, _ev(BASE[:20]), None)
    assert verdict == "INCONCLUSIVE" and _status(rows, "min_problems") == "INCONCLUSIVE"


def test_missing_metrics_fail_closed():
    ev = _ev(BASE, suite="other")
    verdict, rows = decide(POLICY, ev, None)
    assert verdict == "REJECT" and any(r.criterion == "evidence" and r.status == "FAIL" for r in rows)
    no_teacher = EvidenceBody.model_validate(
        {"suites": {"embedded": {"candidate": problems(BASE)}}, "cost": {"device_hours": 1, "usd": 1}}
    )
    assert _status(decide(POLICY, no_teacher, None)[1], "teacher_gap") == "FAIL"
    no_cost = EvidenceBody.model_validate(
        {"suites": {"embedded": {"candidate": problems(BASE), "teacher": problems([0.9] * 100)}}}
    )
    assert _status(decide(POLICY, no_cost, None)[1], "cost_usd") == "FAIL"
    champ_without_evidence = ChampionEvidence(version=4, suites={}, cost=None)
    verdict, rows = decide(POLICY, _ev(BASE), champ_without_evidence)
    assert verdict == "REJECT" and _status(rows, "non_inferiority") == "FAIL"


@pytest.mark.parametrize(
    ("length", "usd", "champ_length", "champ_usd", "failing"),
    [
        (40.0, 1.0, 20.0, 1.0, "length_tokens_ratio"),
        (20.0, 2.0, 20.0, 1.0, "cost_usd_ratio"),
        (70.0, 1.0, 60.0, 1.0, "length_tokens_max"),
        (20.0, 11.0, 20.0, 10.0, "cost_usd_max"),
    ],
)
def test_cost_and_length_regressions_are_criteria(length, usd, champ_length, champ_usd, failing):
    verdict, rows = decide(
        POLICY, _ev(BASE, length=length, usd=usd), _champ(BASE, length=champ_length, usd=champ_usd)
    )
    assert verdict == "REJECT"
    assert [r.criterion for r in rows if r.status == "FAIL"] == [failing]


def test_floor_and_teacher_gap():
    verdict, rows = decide(POLICY, _ev([0.25] * 100, teacher=0.9), None)
    assert verdict == "REJECT" and _status(rows, "floor") == "FAIL" and _status(rows, "teacher_gap") == "FAIL"


def test_decision_is_deterministic_given_the_seed():
    rng = np.random.default_rng(1)
    champ = list(rng.integers(0, 5, 80) / 4)
    cand = list(rng.integers(0, 5, 80) / 4)
    a = decide(POLICY, _ev(cand), _champ(champ))
    b = decide(POLICY, _ev(cand), _champ(champ))
    assert a == b
    lo1, _ = bootstrap_mean_ci(np.array(cand) - np.array(champ), seed=1, n_resamples=500, confidence=0.95)
    lo2, _ = bootstrap_mean_ci(np.array(cand) - np.array(champ), seed=2, n_resamples=500, confidence=0.95)
    assert lo1 != lo2


def test_bootstrap_bound_brackets_the_mean():
    d = np.array([0.1, -0.2, 0.05, 0.0, 0.3] * 20)
    lo, hi = bootstrap_mean_ci(d, seed=0, n_resamples=2000, confidence=0.95)
    assert lo < d.mean() < hi and hi - lo < 0.15


def test_example_policy_file_validates():
    spec = load_policy_file("policies/default.yaml")
    assert spec.suites["embedded"].min_problems == 50 and spec.length_tokens.max_ratio_to_champion == 1.5


def _gap_ev(cand: float, teacher: float | None, base: float | None, n: int = 100) -> EvidenceBody:
    suite = {"candidate": problems([cand] * n)}
    if teacher is not None:
        suite["teacher"] = problems([teacher] * n)
    if base is not None:
        suite["base"] = problems([base] * n)
    return EvidenceBody.model_validate({"suites": {"embedded": suite}})


GAP_POLICY = PolicySpec.model_validate({"suites": {"embedded": {"min_gap_closed": 0.75}}})


@pytest.mark.parametrize(
    ("cand", "teacher", "base", "status", "share"),
    [
        (1.0, 1.0, 0.0, "PASS", 1.0),
        (0.75, 1.0, 0.0, "PASS", 0.75),  # exactly the threshold passes
        (0.5, 1.0, 0.0, "FAIL", 0.5),
        (0.0, 1.0, 0.25, "FAIL", -1 / 3),  # worse than the base: a negative share
        (0.5, None, 0.0, "FAIL", None),  # teacher missing: fail closed
        (0.5, 1.0, None, "FAIL", None),  # base missing: fail closed
        (0.5, 0.25, 0.5, "FAIL", None),  # the teacher does not beat the base: nothing to close
    ],
)
def test_gap_closed_is_the_share_of_the_teacher_base_gap(cand, teacher, base, status, share):
    verdict, rows = decide(GAP_POLICY, _gap_ev(cand, teacher, base), None)
    (row,) = [r for r in rows if r.criterion == "gap_closed"]
    assert row.status == status and row.threshold == 0.75, row
    assert verdict == ("PROMOTE" if status == "PASS" else "REJECT")
    if share is None:
        assert row.observed is None and "fail closed" in row.detail
    else:
        assert row.observed == pytest.approx(share) and "(teacher - base)" in row.detail


def test_default_policy_rejects_the_base_and_a_weak_student_and_promotes_a_good_one():
    """policies/default.yaml on the measured means (metrics/eval.json: 500 problems, k=4) as a first version."""
    import json
    from pathlib import Path

    ev = json.loads((Path(__file__).resolve().parents[2] / "metrics/eval.json").read_text())["embedded"]
    spec = load_policy_file("policies/default.yaml")

    def decide_for(avg: float):
        def rows(a: float) -> list[dict]:  # round(a * 2000) correct samples spread over 500 problems of k=4
            q, r = divmod(round(a * 2000), 500)
            return [
                {"problem_id": f"p{i}", "k": 4, "n_correct": q + (i < r), "mean_length": 30.0}
                for i in range(500)
            ]

        body = {
            "candidate": rows(avg),
            "teacher": rows(ev["teacher"]["avg_at_k"]),
            "base": rows(ev["student_base"]["avg_at_k"]),
        }
        verdict, criteria = decide(
            spec,
            EvidenceBody.model_validate(
                {"suites": {"embedded": body}, "cost": {"device_hours": 0.1, "usd": 0.0}}
            ),
            None,
        )
        return verdict, {c.criterion for c in criteria if c.status == "FAIL"}

    assert decide_for(ev["student_base"]["avg_at_k"]) == ("REJECT", {"floor", "teacher_gap", "gap_closed"})
    verdict, failed = decide_for(0.211)  # the README's 30-step smoke student
    assert verdict == "REJECT" and "gap_closed" in failed
    assert decide_for(ev["student"]["avg_at_k"]) == ("PROMOTE", set())
