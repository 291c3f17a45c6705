"""Hand-computed evaluation metrics: pass@k (unbiased), Avg@k, Best@k, bootstrap CI, lengths, Dist-4g."""

from __future__ import annotations

from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.eval_metrics import (
    avg_at_k,
    best_at_k,
    bootstrap_ci,
    distinct_4gram_ratio,
    length_stats,
    pass_at_k,
    pass_at_k_estimate,
)


def test_pass_at_k_hand_computed() -> None:
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k_estimate(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k_estimate(5, 2, 2) == pytest.approx(0.7)
    # n-c < k: always a correct one in the subset
    assert pass_at_k_estimate(4, 3, 2) == 1.0
    assert pass_at_k_estimate(4, 0, 4) == 0.0
    # k=1 is the fraction correct
    assert pass_at_k_estimate(8, 3, 1) == pytest.approx(3 / 8)
    # mean over problems
    assert pass_at_k([1, 2], n=4, k=2) == pytest.approx((0.5 + (1 - comb(2, 2) / comb(4, 2))) / 2)


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_monotone_in_k_and_c(args: tuple[int, int, int]) -> None:
    n, c, k = args
    p = pass_at_k_estimate(n, c, k)
    assert 0.0 <= p <= 1.0
    if k < n:
        assert pass_at_k_estimate(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k_estimate(n, c + 1, k) >= p - 1e-12


def test_avg_best_and_pass_with_n_equal_k() -> None:
    n_correct = [0, 1, 4, 2]  # k = 4
    assert avg_at_k(n_correct, 4) == pytest.approx((0 + 0.25 + 1 + 0.5) / 4)
    assert best_at_k(n_correct, 4) == pytest.approx(0.75)
    assert pass_at_k(n_correct, n=4, k=4) == pytest.approx(0.75)  # equals Best@k when n == k


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pass_at_k_estimate(3, 1, 4), "k <= n"),
        (lambda: pass_at_k_estimate(3, 5, 2), "n_correct"),
        (lambda: avg_at_k([], 4), "no problems"),
        (lambda: avg_at_k([5], 4), r"\[0, 4\]"),
        (lambda: bootstrap_ci([], seed=0), "at least one"),
    ],
)
def test_bad_counts_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    values = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0, 0.5]
    lo, hi = bootstrap_ci(values, seed=3)
    assert (lo, hi) == bootstrap_ci(values, seed=3)
    assert lo <= sum(values) / len(values) <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_ci([0.5, 0.5, 0.5], seed=0) == (0.5, 0.5)


def test_length_stats() -> None:
    stats = length_stats([1, 2, 3, 4, 100])
    assert stats["mean_length"] == pytest.approx(22.0)
    assert stats["median_length"] == 3.0
    assert stats["p95_length"] == pytest.approx(4 + 0.8 * 96)  # linear interpolation between 4 and 100


def test_distinct_4gram_hand_computed() -> None:
    # Problem 1: "a b c d e" -> (abcd, bcde); "a b c d" -> (abcd): 3 grams, 2 unique -> 2/3.
    # Problem 2: "x y z w" and "p q r s" -> 2 grams, 2 unique -> 1.
    # Problem 3: no 4-gram at all -> left out.
    got = distinct_4gram_ratio([["a b c d e", "a b c d"], ["x y z w", "p q r s"], ["one two", "three"]])
    assert got == pytest.approx((2 / 3 + 1.0) / 2)
    # n-grams do not cross response boundaries: "a b" + "c d" would make (a b c d) if they did.
    assert distinct_4gram_ratio([["a b", "c d"]]) == 0.0
    # identical responses: k copies of the same gram -> 1/k
    assert distinct_4gram_ratio([["s t u v"] * 4]) == pytest.approx(0.25)
