"""The unbiased pass@k estimator (`rftjax.evaluate.pass_at_k_curve`) against brute-force enumeration of
k-subsets, exact binomials at n = 64, and a hand-computed example."""

import itertools
import math

import numpy as np
import pytest

from rftjax.evaluate import pass_at_k_curve


def brute_force(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        expected = [brute_force(n, c, k) for k in range(1, n + 1)]
        np.testing.assert_allclose(pass_at_k_curve(n, [c]), expected, rtol=0, atol=1e-12)
    # the curve of several problems is the mean of theirs
    counts = [0, 1, n]
    expected = np.mean([[brute_force(n, c, k) for k in range(1, n + 1)] for c in counts], axis=0)
    np.testing.assert_allclose(pass_at_k_curve(n, counts), expected, rtol=0, atol=1e-12)


def test_hand_computed_and_large_n():
    # n = 4, one correct: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@3 = 3/4, pass@4 = 1
    np.testing.assert_allclose(pass_at_k_curve(4, [1]), [0.25, 0.5, 0.75, 1.0], atol=1e-12)
    n = 64
    for c in (0, 1, 3, 20, 63, 64):
        exact = [1 - math.comb(n - c, k) / math.comb(n, k) for k in range(1, n + 1)]
        np.testing.assert_allclose(pass_at_k_curve(n, [c]), exact, rtol=0, atol=1e-12)


def test_bad_counts_raise():
    for n, counts in [(0, [0]), (4, []), (4, [5]), (4, [-1])]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k_curve(n, counts)
