"""The decision engine: policy + evidence -> PROMOTE / REJECT / INCONCLUSIVE with a per-criterion table.

Pure and deterministic (the bootstrap uses ``numpy.random.default_rng(policy.bootstrap.seed)``). Rules:
- any FAIL -> REJECT; else any INCONCLUSIVE -> INCONCLUSIVE; else PROMOTE.
- A threshold that is set but whose metric is missing from the evidence FAILs (fail closed).
- With no champion (first version), champion-relative criteria are NOT_APPLICABLE, not failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.drift import PromotedValues, drift_criteria
from server.policy import Budget, PolicySpec, SuiteRule
from server.schemas import Cost, Criterion, EvidenceBody, ProblemResult, Verdict

_CHUNK_DRAWS = 1 << 20


@dataclass(frozen=True)
class ChampionEvidence:
    """What is known about the current champion: its version, per-suite problems, cost and lengths."""

    version: int
    suites: dict[str, Sequence[ProblemResult]]
    cost: Cost | None


def decide(
    policy: PolicySpec,
    evidence: EvidenceBody,
    champion: ChampionEvidence | None,
    recent: Sequence[PromotedValues] = (),
) -> tuple[Verdict, list[Criterion]]:
    """Evaluate every criterion of ``policy``; returns the verdict and the table explaining it. ``recent``: the
    last promoted versions' values, newest first (``server.cost_history.recent_promoted``), for the
    ``max_ratio_to_recent_median`` criteria."""
    rows: list[Criterion] = []
    for suite, rule in policy.suites.items():
        rows.extend(_suite_criteria(suite, rule, evidence, champion, policy))
    rows.extend(_length_criteria(policy, evidence, champion))
    rows.extend(_cost_criteria("cost_usd", policy.cost_usd, evidence, champion, lambda c: c.usd))
    rows.extend(
        _cost_criteria("device_hours", policy.device_hours, evidence, champion, lambda c: c.device_hours)
    )
    rows.extend(drift_criteria(policy, evidence, recent))
    statuses = {r.status for r in rows}
    verdict: Verdict = (
        "REJECT" if "FAIL" in statuses else "INCONCLUSIVE" if "INCONCLUSIVE" in statuses else "PROMOTE"
    )
    return verdict, rows


def scores(problems: Sequence[ProblemResult]) -> dict[str, float]:
    """problem_id -> Avg@k (n_correct / k)."""
    return {p.problem_id: p.n_correct / p.k for p in problems}


def mean_length(problems: Sequence[ProblemResult]) -> float:
    return float(np.mean([p.mean_length for p in problems]))


def bootstrap_mean_ci(
    diffs: np.ndarray, *, seed: int, n_resamples: int, confidence: float
) -> tuple[float, float]:
    """Percentile bootstrap of the mean of ``diffs`` ``[n]``: returns the one-sided (lower, upper) bounds at
    ``confidence`` (lower = (1-confidence) quantile, upper = confidence quantile)."""
    rng = np.random.default_rng(seed)
    n = diffs.shape[0]
    # Resample in chunks of rows so memory stays ~_CHUNK_DRAWS x 16 bytes whatever R x n is.
    rows = max(1, _CHUNK_DRAWS // max(n, 1))
    means = np.empty(n_resamples)  # [R]
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # [rows, n]
        means[start:stop] = diffs[idx].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence)), float(np.quantile(means, confidence))


# ---------------------------------------------------------------------------------------------- per suite
def _suite_criteria(
    suite: str, rule: SuiteRule, ev: EvidenceBody, champ: ChampionEvidence | None, policy: PolicySpec
) -> list[Criterion]:
    data = ev.suites.get(suite)
    if data is None:
        return [
            Criterion(
                criterion="evidence",
                suite=suite,
                status="FAIL",
                detail=f"suite {suite!r} missing from the evidence",
            )
        ]
    cand = scores(data.candidate)
    cand_mean = float(np.mean(list(cand.values())))
    rows = [_sample_size(suite, len(cand), rule.min_problems)]
    if rule.floor is not None:
        ok = cand_mean >= rule.floor
        rows.append(
            Criterion(
                criterion="floor",
                suite=suite,
                status="PASS" if ok else "FAIL",
                observed=cand_mean,
                threshold=rule.floor,
                detail=f"candidate mean Avg@k {cand_mean:.4f} {'>=' if ok else '<'} floor {rule.floor}",
            )
        )
    if rule.max_teacher_gap is not None:
        rows.append(_teacher_gap(suite, rule.max_teacher_gap, cand_mean, data.teacher))
    if rule.non_inferiority_margin is not None:
        champ_rows = (
            data.champion if data.champion is not None else (champ.suites.get(suite) if champ else None)
        )
        rows.append(_non_inferiority(suite, rule, cand, champ, champ_rows, policy))
    if rule.min_fixed_fraction is not None:
        rows.append(fixed_failures(suite, rule, cand, data.recorded_failures, champ))
    return rows


def _sample_size(suite: str, n: int, minimum: int) -> Criterion:
    ok = n >= minimum
    return Criterion(
        criterion="min_problems",
        suite=suite,
        status="PASS" if ok else "INCONCLUSIVE",
        observed=n,
        threshold=minimum,
        detail=f"{n} candidate problems ({'enough' if ok else 'too few'}; policy needs {minimum})",
    )


def _teacher_gap(
    suite: str, max_gap: float, cand_mean: float, teacher: Sequence[ProblemResult] | None
) -> Criterion:
    if teacher is None:
        return Criterion(
            criterion="teacher_gap",
            suite=suite,
            status="FAIL",
            threshold=max_gap,
            detail="teacher results missing (fail closed)",
        )
    gap = float(np.mean(list(scores(teacher).values()))) - cand_mean
    ok = gap <= max_gap
    return Criterion(
        criterion="teacher_gap",
        suite=suite,
        status="PASS" if ok else "FAIL",
        observed=gap,
        threshold=max_gap,
        detail=f"teacher - candidate = {gap:.4f} {'<=' if ok else '>'} max gap {max_gap}",
    )


def _non_inferiority(
    suite: str,
    rule: SuiteRule,
    cand: dict[str, float],
    champ: ChampionEvidence | None,
    champ_rows: Sequence[ProblemResult] | None,
    policy: PolicySpec,
) -> Criterion:
    margin = rule.non_inferiority_margin
    assert margin is not None
    if champ is None and champ_rows is None:
        return Criterion(
            criterion="non_inferiority",
            suite=suite,
            status="NOT_APPLICABLE",
            threshold=-margin,
            detail="no champion yet",
        )
    if champ_rows is None:
        return Criterion(
            criterion="non_inferiority",
            suite=suite,
            status="FAIL",
            threshold=-margin,
            detail=f"no evidence for champion v{champ.version if champ else '?'} on this suite (fail closed)",
        )
    ref = scores(champ_rows)
    paired = sorted(set(cand) & set(ref))
    if len(paired) < rule.min_problems:
        return Criterion(
            criterion="non_inferiority",
            suite=suite,
            status="INCONCLUSIVE",
            observed=len(paired),
            threshold=-margin,
            detail=f"only {len(paired)} problems shared with the champion; policy needs {rule.min_problems}",
        )
    diffs = np.array([cand[p] - ref[p] for p in paired])
    b = policy.bootstrap
    lo, hi = bootstrap_mean_ci(diffs, seed=b.seed, n_resamples=b.n_resamples, confidence=b.confidence)
    mean = float(diffs.mean())
    status = "PASS" if lo > -margin else "FAIL" if hi < -margin else "INCONCLUSIVE"
    return Criterion(
        criterion="non_inferiority",
        suite=suite,
        status=status,
        observed=lo,
        threshold=-margin,
        detail=(
            f"paired diff (candidate - champion) over {len(paired)} problems: mean {mean:+.4f}, "
            f"{b.confidence:.0%} one-sided bounds [{lo:+.4f}, {hi:+.4f}] vs margin -{margin}"
        ),
    )


def fixed_failures(
    suite: str,
    rule: SuiteRule,
    cand: dict[str, float],
    recorded: dict[str, list[str]] | None,
    champ: ChampionEvidence | None,
) -> Criterion:
    """``min_fixed_fraction``: M = problems recorded as failures of the champion version, N = those where the
    candidate's Avg@k >= ``rule.fixed_min_avg_at_k`` (a recorded failure missing from the candidate's results is
    not fixed). PASS when N / M >= the threshold. The detail reads "fixes N of M failures of v<champion>"."""
    need = rule.min_fixed_fraction
    assert need is not None
    if champ is None:
        return Criterion(criterion="fixed_failures", suite=suite, status="NOT_APPLICABLE", threshold=need,
                         detail="no champion yet: no recorded failures to fix")  # fmt: skip
    if recorded is None:
        return Criterion(criterion="fixed_failures", suite=suite, status="FAIL", threshold=need,
                         detail="no failure record (recorded_failures) in the evidence (fail closed)")  # fmt: skip
    failed = sorted(set(recorded.get(str(champ.version), [])))
    if not failed:
        return Criterion(criterion="fixed_failures", suite=suite, status="NOT_APPLICABLE", threshold=need,
                         detail=f"fixes 0 of 0 failures of v{champ.version}: none on record in this suite")  # fmt: skip
    fixed = [p for p in failed if cand.get(p, 0.0) >= rule.fixed_min_avg_at_k]
    missing = [p for p in failed if p not in cand]
    share = len(fixed) / len(failed)
    ok = share >= need
    return Criterion(
        criterion="fixed_failures",
        suite=suite,
        status="PASS" if ok else "FAIL",
        observed=share,
        threshold=need,
        detail=(
            f"fixes {len(fixed)} of {len(failed)} failures of v{champ.version} ({share:.0%} "
            f"{'>=' if ok else '<'} {need:.0%}; fixed = candidate Avg@k >= {rule.fixed_min_avg_at_k:g})"
            + (f"; {len(missing)} not in the candidate's results (counted unfixed)" if missing else "")
        ),
    )


# ---------------------------------------------------------------------------------------------- budgets
def _length_criteria(policy: PolicySpec, ev: EvidenceBody, champ: ChampionEvidence | None) -> list[Criterion]:
    budget = policy.length_tokens
    if budget.max is None and budget.max_ratio_to_champion is None:
        return []
    suites = [s for s in policy.suites if s in ev.suites]
    if not suites:
        return [
            Criterion(
                criterion="length_tokens",
                status="FAIL",
                detail="no suite with lengths in the evidence (fail closed)",
            )
        ]
    cand = float(np.mean([mean_length(ev.suites[s].candidate) for s in suites]))
    champ_val = None
    if champ is not None:
        rows = [ev.suites[s].champion or champ.suites.get(s) for s in suites]
        champ_val = float(np.mean([mean_length(r) for r in rows])) if all(rows) else None
    return _budget_rows("length_tokens", budget, cand, champ, champ_val, "tokens")


def _cost_criteria(
    name: str, budget: Budget, ev: EvidenceBody, champ: ChampionEvidence | None, field
) -> list[Criterion]:  # type: ignore[no-untyped-def]
    if budget.max is None and budget.max_ratio_to_champion is None:
        return []
    if ev.cost is None:
        return [
            Criterion(criterion=name, status="FAIL", detail="cost missing from the evidence (fail closed)")
        ]
    champ_val = field(champ.cost) if champ is not None and champ.cost is not None else None
    return _budget_rows(name, budget, float(field(ev.cost)), champ, champ_val, name)


def _budget_rows(
    name: str,
    budget: Budget,
    value: float,
    champ: ChampionEvidence | None,
    champ_val: float | None,
    unit: str,
) -> list[Criterion]:
    rows = []
    if budget.max is not None:
        ok = value <= budget.max
        rows.append(
            Criterion(
                criterion=f"{name}_max",
                status="PASS" if ok else "FAIL",
                observed=value,
                threshold=budget.max,
                detail=f"candidate {value:.4g} {unit} {'<=' if ok else '>'} cap {budget.max:.4g}",
            )
        )
    if budget.max_ratio_to_champion is not None:
        cap = budget.max_ratio_to_champion
        if champ is None:
            rows.append(
                Criterion(
                    criterion=f"{name}_ratio",
                    status="NOT_APPLICABLE",
                    threshold=cap,
                    detail="no champion yet",
                )
            )
        elif champ_val is None:
            rows.append(
                Criterion(
                    criterion=f"{name}_ratio",
                    status="FAIL",
                    threshold=cap,
                    detail=f"champion v{champ.version} has no {name} on record (fail closed)",
                )
            )
        else:
            ratio = value / champ_val if champ_val > 0 else (1.0 if value == 0 else float("inf"))
            ok = ratio <= cap
            rows.append(
                Criterion(
                    criterion=f"{name}_ratio",
                    status="PASS" if ok else "FAIL",
                    observed=ratio,
                    threshold=cap,
                    detail=f"candidate/champion = {value:.4g}/{champ_val:.4g} = {ratio:.3f} {'<=' if ok else '>'} {cap}",
                )
            )
    return rows
