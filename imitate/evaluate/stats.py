"""Accuracy with a 95 % interval, and the paired difference student − base on the same items. Pure functions.

    acc = accuracy([True, False, True])              # Accuracy(correct=2, n=3, accuracy=0.667, ci95=(0.208, 0.939))
    diff = paired([True, True, False], [True, False, False], seed=0)
    diff.diff, diff.ci95, diff.p_value               # +0.333, bootstrap interval, McNemar exact p

- **Wilson score interval** for one accuracy: unlike the normal (Wald) interval it stays inside [0, 1] and keeps
  its coverage at 0 %, 100 % and small n, which eval sets of 50–100 items are.
- **Paired difference**: both models answer the same items, so what matters is the discordant items — `b`
  where only the student is right, `c` where only the base is. The difference is (b − c) / n.
  *McNemar's exact test*: under "no difference" each discordant item is a fair coin, so the two-sided p-value is
  2 · P(Binomial(b + c, ½) ≤ min(b, c)), capped at 1 (1 when there are no discordant items).
  *Paired bootstrap*: resampling items with replacement draws the counts of (student-only, base-only, other)
  items from Multinomial(n, (b/n, c/n, rest/n)) — the same distribution as resampling item indices, at a cost that
  does not grow with n — and the 2.5 / 97.5 percentiles of (b* − c*) / n are the 95 % interval. Seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054  # the 97.5 % quantile of the standard normal
BOOTSTRAP_SAMPLES = 10_000


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    accuracy: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": list(self.ci95)}


@dataclass(frozen=True)
class PairedDiff:
    n: int
    diff: float  # accuracy(student) − accuracy(base)
    ci95: tuple[float, float]  # paired bootstrap percentile interval
    p_value: float  # McNemar exact, two-sided
    both: int
    student_only: int
    base_only: int
    neither: int
    method: str = f"McNemar exact test; paired bootstrap ({BOOTSTRAP_SAMPLES} resamples, percentile)"

    def to_dict(self) -> dict:
        return {**asdict(self), "ci95": list(self.ci95)}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/n ((0, 1) when n is 0)."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} outside 0..{n}")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0 and n the bound is exactly 0 / 1; float rounding must not leave the point estimate outside.
    return (0.0 if correct == 0 else max(0.0, centre - half), 1.0 if correct == n else min(1.0, centre + half))


def accuracy(outcomes: Sequence[bool]) -> Accuracy:
    n, k = len(outcomes), sum(bool(x) for x in outcomes)
    return Accuracy(k, n, k / n if n else 0.0, wilson(k, n))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def bootstrap_diff(b: int, c: int, n: int, *, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95 % percentile interval of (b* − c*) / n over paired bootstrap resamples of n items."""
    if n == 0:
        return (0.0, 0.0)
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=samples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return (float(lo), float(hi))


def paired(student: Sequence[bool], base: Sequence[bool], *, seed: int = 0) -> PairedDiff:
    """student − base on the same items, in the same order."""
    if len(student) != len(base):
        raise ValueError(f"paired outcomes differ in length: {len(student)} vs {len(base)}")
    both = sum(1 for s, b in zip(student, base, strict=True) if s and b)
    s_only = sum(1 for s, b in zip(student, base, strict=True) if s and not b)
    b_only = sum(1 for s, b in zip(student, base, strict=True) if b and not s)
    n = len(student)
    return PairedDiff(
        n=n,
        diff=(s_only - b_only) / n if n else 0.0,
        ci95=bootstrap_diff(s_only, b_only, n, seed=seed),
        p_value=mcnemar_exact(s_only, b_only),
        both=both,
        student_only=s_only,
        base_only=b_only,
        neither=n - both - s_only - b_only,
    )
