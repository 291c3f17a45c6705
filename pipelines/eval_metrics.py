"""Evaluation metrics over ``k`` sampled responses per problem (oprd-method.md section 7).

All accuracies are fractions in [0, 1] (the paper reports them x100).

* Avg@k = mean over problems of ``n_correct / k`` (an unbiased pass@1 estimate).
* pass@k (unbiased, Chen et al. 2021) for ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``, averaged
  over problems. With ``n == k`` (the evaluate stage samples exactly ``k``) it equals Best@k.
* Best@k = mean over problems of ``max(correct)`` (1 if any of the k responses is correct).
* Avg@k 95% CI: percentile bootstrap over problems (resample problems with replacement, :data:`BOOTSTRAP_RESAMPLES`
  times, ``numpy.random.default_rng(seed)``), so the interval reflects problem sampling, the dominant uncertainty
  for 30-problem suites.
* Lengths: response tokens including EOS; mean, median, and the 95th percentile (linear interpolation).
* Dist-4g = mean over problems of ``|unique 4-grams| / |4-grams|``, 4-grams of whitespace tokens pooled over the
  problem's k responses (n-grams never cross a response boundary). Problems whose responses contain no 4-gram at
  all are left out of the mean; if no problem has one, Dist-4g is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "avg_at_k",
    "best_at_k",
    "bootstrap_ci",
    "distinct_4gram_ratio",
    "length_stats",
    "pass_at_k",
    "pass_at_k_estimate",
]

BOOTSTRAP_RESAMPLES = 2000


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct: ``1 - C(n-c,k)/C(n,k)``."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"n_correct must be in [0, n], got c={c}, n={n}")
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _check_counts(n_correct: Sequence[int], n: int) -> None:
    if len(n_correct) == 0:
        raise ValueError("no problems to score")
    if n <= 0 or any(not 0 <= c <= n for c in n_correct):
        raise ValueError(f"each n_correct must be in [0, {n}], got {list(n_correct)}")


def pass_at_k(n_correct: Sequence[int], n: int, k: int) -> float:
    """Mean unbiased pass@k over problems; ``n_correct[i]`` of ``n`` samples of problem ``i`` are correct."""
    _check_counts(n_correct, n)
    return float(np.mean([pass_at_k_estimate(n, c, k) for c in n_correct]))


def avg_at_k(n_correct: Sequence[int], k: int) -> float:
    """Mean over problems of ``n_correct / k``."""
    _check_counts(n_correct, k)
    return float(np.mean(np.asarray(n_correct, dtype=np.float64) / k))


def best_at_k(n_correct: Sequence[int], k: int) -> float:
    """Fraction of problems with at least one correct response among ``k``."""
    _check_counts(n_correct, k)
    return float(np.mean(np.asarray(n_correct) > 0))


def bootstrap_ci(
    values: Sequence[float], *, seed: int, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(values)`` resampling the values (problems) with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """``{"mean_length", "median_length", "p95_length"}`` of response lengths in tokens."""
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        raise ValueError("length_stats needs at least one length")
    return {
        "mean_length": float(x.mean()),
        "median_length": float(np.median(x)),
        "p95_length": float(np.percentile(x, 95)),
    }


def _four_grams(text: str) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + 4]) for i in range(len(words) - 3)]


def distinct_4gram_ratio(responses_per_problem: Sequence[Sequence[str]]) -> float:
    """Dist-4g: mean over problems of unique/total whitespace 4-grams pooled over that problem's responses."""
    ratios = []
    for responses in responses_per_problem:
        grams = [g for r in responses for g in _four_grams(r)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return float(np.mean(ratios)) if ratios else 0.0
