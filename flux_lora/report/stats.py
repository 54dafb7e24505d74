"""Is a cell's difference from baseline real? Means with Student-t intervals, Welch's t-test, Holm's correction.

Why Welch and not a bootstrap: a sweep has 2-5 seeds per cell, and a bootstrap of 3 values has only 10
distinct resamples, so its intervals come out too narrow exactly where it matters. Welch's test does not
assume equal spreads (a cell such as min-SNR or dropout can be noisier than baseline). Holm's step-down
correction keeps the chance of any false "better"/"worse" among the cells at alpha, like Bonferroni, but
rejects at least as often. The t distribution comes from scipy; the arithmetic around it is here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from scipy.stats import t as student_t

ALPHA = 0.05
CONFIDENCE = 0.95


class Verdict(str, Enum):
    better = "better"
    worse = "worse"
    same = "no detectable difference"
    untested = "-"  # fewer than 2 values on a side, no baseline, or the metric is not comparable


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with its 95% interval; low/high are None for a single value."""

    n: int
    mean: float
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean


@dataclass(frozen=True)
class WelchResult:
    t: float
    df: float
    p: float


@dataclass(frozen=True)
class Comparison:
    """One cell against baseline on one metric."""

    difference: float  # cell mean - baseline mean
    p: float | None
    p_holm: float | None
    verdict: Verdict


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate | None:
    """Mean and two-sided Student-t interval: mean +- t(1 - (1 - confidence)/2, n - 1) * s / sqrt(n)."""
    if not values:
        return None
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(n, mean, None, None)
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(n, mean, mean - half, mean + half)


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchResult | None:
    """Two-sided Welch's t-test of mean(a) == mean(b); None when a side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = math.fsum(a) / len(a), math.fsum(b) / len(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = var_a + var_b
    if se2 == 0.0:
        # No spread at all (peak memory of a deterministic run): a difference is exact, none is none.
        same = mean_a == mean_b
        return WelchResult(
            0.0 if same else math.copysign(math.inf, mean_a - mean_b), float(len(a) + len(b) - 2), 1.0 if same else 0.0
        )
    t = (mean_a - mean_b) / math.sqrt(se2)
    # Welch-Satterthwaite degrees of freedom.
    df = se2**2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return WelchResult(t, df, float(2.0 * student_t.sf(abs(t), df)))


def holm_adjust(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (None stays None and does not count as a test)."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(ranked)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, index) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: a smaller p never gets a larger adjustment
        adjusted[index] = running
    return adjusted


def compare_to_baseline(
    baseline: Sequence[float], cells: dict[str, Sequence[float]], lower_is_better: bool, alpha: float = ALPHA
) -> dict[str, Comparison]:
    """Each cell against baseline, Holm-corrected over the cells that could be tested."""
    names = list(cells)
    tests = [welch_test(cells[name], baseline) for name in names]
    adjusted = holm_adjust([None if test is None else test.p for test in tests])
    base_mean = math.fsum(baseline) / len(baseline) if baseline else math.nan
    out: dict[str, Comparison] = {}
    for name, test, p_holm in zip(names, tests, adjusted):
        values = cells[name]
        difference = (math.fsum(values) / len(values) - base_mean) if values and baseline else math.nan
        if test is None or p_holm is None:
            verdict = Verdict.untested
        elif p_holm >= alpha:
            verdict = Verdict.same
        else:
            verdict = Verdict.better if (difference < 0) == lower_is_better else Verdict.worse
        out[name] = Comparison(difference, None if test is None else test.p, p_holm, verdict)
    return out
