"""Slow-drift criteria: the candidate against the median of the last K promoted versions.

A per-step ratio to the champion (``max_ratio_to_champion``) lets cost or response length creep up by just under
the cap at every promotion: five promotions at +15% each pass a 1.5x per-step cap while the fifth costs 1.75x the
first. ``max_ratio_to_recent_median`` compares with the median of the last ``recent_k`` promoted versions instead,
so the drift is caught once it adds up. Pure (no database): ``server.cost_history.recent_promoted`` reads the
promoted versions' values and ``server.decision.decide`` calls :func:`drift_criteria`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.policy import Budget, PolicySpec
from server.schemas import Criterion, EvidenceBody


@dataclass(frozen=True)
class PromotedValues:
    """What a promoted version cost and how long its answers were (``None``: not in its latest evidence)."""

    version: int
    usd: float | None
    device_hours: float | None
    length_tokens: float | None
    """Mean response length in tokens over the policy's suites present in its evidence."""


def policy_mean_length(policy: PolicySpec, ev: EvidenceBody) -> float | None:
    """Mean over the policy's suites (those in ``ev``) of the candidate's mean response length, in tokens; the same
    quantity the ``length_tokens`` criteria compare. ``None`` when no policy suite is in the evidence."""
    suites = [s for s in policy.suites if s in ev.suites]
    if not suites:
        return None
    return float(np.mean([np.mean([p.mean_length for p in ev.suites[s].candidate]) for s in suites]))


def needed_k(policy: PolicySpec) -> int:
    """How many recently promoted versions the policy's drift criteria look at (0: none is set)."""
    budgets = (policy.length_tokens, policy.cost_usd, policy.device_hours)
    return max((b.recent_k for b in budgets if b.max_ratio_to_recent_median is not None), default=0)


def drift_criteria(policy: PolicySpec, ev: EvidenceBody, recent: Sequence[PromotedValues]) -> list[Criterion]:
    """One ``<metric>_recent_median`` row per budget with ``max_ratio_to_recent_median`` set. ``recent`` is newest
    first and excludes the candidate itself. Candidate value missing: FAIL (fail closed); fewer than 2 promoted
    versions with the value on record: NOT_APPLICABLE."""
    cost = ev.cost
    specs: list[tuple[str, Budget, float | None, Callable[[PromotedValues], float | None], str]] = [
        ("length_tokens", policy.length_tokens, policy_mean_length(policy, ev), lambda r: r.length_tokens, "tokens"),
        ("cost_usd", policy.cost_usd, cost.usd if cost else None, lambda r: r.usd, "USD"),
        ("device_hours", policy.device_hours, cost.device_hours if cost else None, lambda r: r.device_hours,
         "device-hours"),
    ]  # fmt: skip
    return [
        _row(name, budget, value, recent, field, unit)
        for name, budget, value, field, unit in specs
        if budget.max_ratio_to_recent_median is not None
    ]


def _row(
    name: str,
    budget: Budget,
    value: float | None,
    recent: Sequence[PromotedValues],
    field: Callable[[PromotedValues], float | None],
    unit: str,
) -> Criterion:
    cap = budget.max_ratio_to_recent_median
    assert cap is not None
    crit = f"{name}_recent_median"
    if value is None:
        return Criterion(criterion=crit, status="FAIL", threshold=cap,
                         detail=f"candidate {name} missing from the evidence (fail closed)")  # fmt: skip
    window = [(r.version, v) for r in recent[: budget.recent_k] if (v := field(r)) is not None]
    if len(window) < 2:
        return Criterion(
            criterion=crit, status="NOT_APPLICABLE", threshold=cap,
            detail=f"{len(window)} promoted version(s) with {name} on record; the median needs 2",
        )  # fmt: skip
    median = float(np.median([v for _, v in window]))
    ratio = value / median if median > 0 else (1.0 if value == 0 else float("inf"))
    ok = ratio <= cap
    versions = ",".join(f"v{v}" for v, _ in window)
    return Criterion(
        criterion=crit,
        status="PASS" if ok else "FAIL",
        observed=ratio,
        threshold=cap,
        detail=(
            f"candidate/median of last {len(window)} promoted ({versions}) = {value:.4g}/{median:.4g} {unit} "
            f"= {ratio:.3f} {'<=' if ok else '>'} {cap}"
        ),
    )
