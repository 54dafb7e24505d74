"""The interval and test arithmetic of flux_lora/report/stats.py against scipy.stats on fixed numbers."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from flux_lora.report.stats import Verdict, compare_to_baseline, holm_adjust, mean_interval, welch_test

# Validation losses of three seeds (the shape of a real cell: tiny spreads, small n).
BASELINE = [1.43122, 1.43125, 1.43117]
A1 = [1.42277, 1.42285, 1.42213]
NOISY = [1.4301, 1.4329, 1.4318]
UNEQUAL = [2.1, 2.9, 2.4, 3.3, 2.2]


@pytest.mark.parametrize("values", [BASELINE, A1, UNEQUAL, [0.5, 0.7]])
def test_mean_interval_matches_scipy_t_interval(values: list[float]) -> None:
    estimate = mean_interval(values)
    low, high = scipy_stats.t.interval(
        0.95, len(values) - 1, loc=sum(values) / len(values), scale=scipy_stats.sem(values)
    )
    assert estimate is not None and estimate.n == len(values)
    assert estimate.low == pytest.approx(low, rel=1e-12) and estimate.high == pytest.approx(high, rel=1e-12)


def test_interval_of_fixed_numbers_by_hand() -> None:
    # mean 2.58, s = sqrt(1.028 / 4) = 0.506952, t(0.975, 4) = 2.776445: half-width = 2.776445 * 0.506952 / sqrt(5) = 0.629464
    estimate = mean_interval(UNEQUAL)
    assert estimate is not None
    assert estimate.mean == pytest.approx(2.58) and estimate.half_width == pytest.approx(0.629464, abs=1e-6)


def test_one_value_has_no_interval_and_none_has_no_estimate() -> None:
    single = mean_interval([1.5])
    assert single is not None and single.mean == 1.5 and single.low is None and single.half_width is None
    assert mean_interval([]) is None


@pytest.mark.parametrize(
    "a,b", [(A1, BASELINE), (NOISY, BASELINE), (UNEQUAL, [2.0, 2.1, 2.05]), ([1.0, 2.0], [1.5, 1.6, 1.4, 1.55])]
)
def test_welch_matches_scipy_ttest_ind_unequal_var(a: list[float], b: list[float]) -> None:
    ours = welch_test(a, b)
    theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert ours is not None
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)


def test_welch_needs_two_values_a_side_and_handles_no_spread() -> None:
    assert welch_test([1.0], [1.0, 2.0]) is None
    exact = welch_test([0.58, 0.58, 0.58], [0.59, 0.59, 0.59])  # peak memory of deterministic runs
    assert exact is not None and exact.p == 0.0 and exact.t == -math.inf
    assert welch_test([0.58, 0.58], [0.58, 0.58]).p == 1.0  # type: ignore[union-attr]


def test_holm_on_fixed_numbers() -> None:
    # Sorted p: 0.01, 0.02, 0.03, 0.04 (m = 4): 0.04, 0.06, 0.06 (monotone), 0.06
    assert holm_adjust([0.03, 0.01, None, 0.04, 0.02]) == pytest.approx([0.06, 0.04, None, 0.06, 0.06])  # type: ignore[arg-type]
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0]
    # Holm never rejects less than Bonferroni (m * p) and never more than the raw p.
    raw = [0.001, 0.011, 0.02, 0.2, 0.04, 0.0125, 0.3, 0.008]
    for p, adjusted in zip(raw, holm_adjust(raw)):
        assert p <= adjusted <= min(1.0, len(raw) * p)  # type: ignore[operator]


def test_compare_marks_better_worse_and_no_difference_after_correction() -> None:
    cells = {"a1": A1, "noisy": NOISY, "worse": [1.4412, 1.4415, 1.4409], "one_seed": [1.40]}
    result = compare_to_baseline(BASELINE, cells, lower_is_better=True)
    assert result["a1"].verdict == Verdict.better and result["a1"].difference < 0
    assert result["worse"].verdict == Verdict.worse
    assert result["noisy"].verdict == Verdict.same  # its interval covers baseline's mean
    assert result["one_seed"].verdict == Verdict.untested and result["one_seed"].p is None
    # Three tests were possible, so the smallest p is multiplied by 3 (Holm's first step).
    smallest = min(result[n].p for n in ("a1", "noisy", "worse"))  # type: ignore[type-var]
    assert min(result[n].p_holm for n in ("a1", "noisy", "worse")) == pytest.approx(3 * smallest)  # type: ignore[type-var]
    # For a metric where higher is better, the same difference reads the other way.
    assert compare_to_baseline(BASELINE, {"a1": A1}, lower_is_better=False)["a1"].verdict == Verdict.worse
