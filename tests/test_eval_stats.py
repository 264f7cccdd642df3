"""Accuracy intervals and the paired student − base difference, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from imitate.evaluate import stats


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # p = 0.8, z² = 3.8415: centre (0.8 + 0.19207) / 1.38415 = 0.71675, half 1.41601 · √0.0256037 = 0.22658
        (8, 10, 0.49016, 0.94331),
        (0, 10, 0.0, 0.27753),  # centre = half = 0.19207 / 1.38415 → (0, 2 · 0.13877)
        (10, 10, 0.72247, 1.0),
        (1, 2, 0.09453, 0.90547),
        (50, 100, 0.40383, 0.59617),
    ],
)
def test_wilson_interval(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-5)
    acc = stats.accuracy([True] * k + [False] * (n - k))
    assert (acc.correct, acc.n, acc.ci95) == (k, n, got)
    assert acc.accuracy == pytest.approx(k / n)


def test_wilson_edges():
    assert stats.wilson(0, 0) == (0.0, 1.0)
    for n in range(1, 60):  # the point estimate is always inside its interval, exactly at the ends
        assert stats.wilson(0, n)[0] == 0.0 and stats.wilson(n, n)[1] == 1.0
        assert all(lo <= k / n <= hi for k in range(n + 1) for lo, hi in [stats.wilson(k, n)])
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (6, 1, 2 * (1 + 7) / 2**7),  # 0.125
        (1, 6, 0.125),
        (10, 0, 2 / 2**10),
        (5, 5, 1.0),  # capped
        (12, 3, 2 * sum(math.comb(15, i) for i in range(4)) / 2**15),  # 0.03516
    ],
)
def test_mcnemar_exact(b, c, p):
    assert stats.mcnemar_exact(b, c) == pytest.approx(p)


def test_paired_counts_and_difference():
    student = [True, True, False, True, False, True, True, False]
    base = [True, False, False, False, True, False, True, False]
    d = stats.paired(student, base, seed=1)
    assert (d.both, d.student_only, d.base_only, d.neither, d.n) == (2, 3, 1, 2, 8)
    assert d.diff == pytest.approx((3 - 1) / 8)
    assert d.p_value == pytest.approx(2 * (1 + 4) / 16)  # b+c = 4, min = 1
    lo, hi = d.ci95
    assert -1 <= lo <= d.diff <= hi <= 1
    assert stats.paired(student, base, seed=1) == d  # seeded: the same interval
    with pytest.raises(ValueError):
        stats.paired([True], [True, False])


def test_paired_bootstrap_matches_resampling_items():
    """The multinomial shortcut has the distribution of resampling item indices: compare the two intervals."""
    import numpy as np

    student = [True] * 30 + [False] * 10 + [True] * 12 + [False] * 48
    base = [True] * 30 + [True] * 10 + [False] * 12 + [False] * 48
    d = stats.paired(student, base, seed=0)
    s, b = np.array(student, dtype=float), np.array(base, dtype=float)
    rng = np.random.default_rng(123)
    idx = rng.integers(0, len(s), size=(20_000, len(s)))
    direct = np.percentile((s[idx] - b[idx]).mean(axis=1), [2.5, 97.5])
    assert d.ci95 == pytest.approx(tuple(direct), abs=0.012)
    # and the normal approximation of the paired difference agrees to within its own error
    se = math.sqrt((12 + 10) / 100 - ((12 - 10) / 100) ** 2) / math.sqrt(100)
    assert d.ci95 == pytest.approx((0.02 - 1.96 * se, 0.02 + 1.96 * se), abs=0.015)


def test_no_discordant_items():
    d = stats.paired([True, False], [True, False])
    assert (d.diff, d.ci95, d.p_value) == (0.0, (0.0, 0.0), 1.0)
    assert d.to_dict()["ci95"] == [0.0, 0.0]
