"""The report's statistics against cases small enough to work out by hand."""

import math

import numpy as np
import pytest

from service.report.statistics import (
    Bootstrap,
    bootstrap_ci,
    compare_groups,
    good_but_specific,
    holm,
    quantile_bins,
    spearman,
    specificity_gap,
    stratified_difference,
    summarize,
    unit_means,
)


def test_summary_mean_median_and_nan_dropped():
    summary = summarize([1.0, 2.0, 3.0, 10.0, float("nan")])
    assert summary.n == 4
    assert summary.mean == pytest.approx(4.0)
    assert summary.median == pytest.approx(2.5)


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.array([0.55, 0.61, 0.72, 0.48, 0.9, 0.66, 0.7, 0.59])
    first = summarize(values, Bootstrap(seed=3))
    again = summarize(values, Bootstrap(seed=3))
    assert first == again
    assert first.ci_low is not None and first.ci_high is not None
    assert first.ci_low < values.mean() < first.ci_high
    # The interval lies within the data's range and is narrower than it.
    assert values.min() <= first.ci_low and first.ci_high <= values.max()
    other = summarize(values, Bootstrap(seed=4))
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)


def test_bootstrap_ci_wider_at_higher_confidence():
    values = np.linspace(0, 1, 15)
    narrow = bootstrap_ci(values, Bootstrap(confidence=0.5))
    wide = bootstrap_ci(values, Bootstrap(confidence=0.99))
    assert narrow is not None and wide is not None
    assert wide[0] < narrow[0] and narrow[1] < wide[1]


def test_degenerate_inputs_give_none_not_nan():
    assert summarize([]).mean is None
    single = summarize([0.7])
    assert single.n == 1 and single.mean == pytest.approx(0.7) and single.ci_low is None
    constant = summarize([0.5, 0.5, 0.5])
    assert (constant.ci_low, constant.ci_high) == (0.5, 0.5)


def test_mann_whitney_by_hand():
    # Every shared value is below every seed-specific one: U of the first sample is 0, and
    # the exact two-sided p is 2 / C(5, 2) = 0.2 (only one of ten orderings is this extreme
    # on each side).
    comparison = compare_groups([1.0, 2.0, 3.0], [4.0, 5.0])
    assert comparison.mann_whitney_u == 0
    assert comparison.p_value == pytest.approx(0.2)
    assert comparison.difference == pytest.approx(2.0 - 4.5)
    assert comparison.shared.median == 2.0 and comparison.seed_specific.median == 4.5
    reverse = compare_groups([4.0, 5.0], [1.0, 2.0, 3.0])
    assert reverse.mann_whitney_u == 6  # n1 * n2 - 0
    # With ties: shared [1, 2], specific [2, 3] -> U = 0 + 0.5 (the tie) = 0.5
    assert compare_groups([1.0, 2.0], [2.0, 3.0]).mann_whitney_u == pytest.approx(0.5)


def test_comparison_with_an_empty_group_has_no_test():
    comparison = compare_groups([0.5, 0.6], [float("nan")])
    assert comparison.seed_specific.n == 0
    assert comparison.p_value is None and comparison.difference is None


def test_spearman_by_hand():
    # Ranks differ by (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    correlation = spearman([1, 2, 3, 4], [10, 30, 20, 40])
    assert correlation.rho == pytest.approx(0.8)
    assert correlation.n == 4
    # Pairs with a NaN on either side are dropped; a constant side has no rho.
    assert spearman([1, 2, float("nan"), 4], [1, 2, 3, 4]).n == 3
    assert spearman([1, 1, 1], [1, 2, 3]).rho is None
    assert spearman([1, 2], [1, 2]).rho is None


def test_good_but_specific_by_hand():
    scores = [0.9, 0.85, 0.5, 0.95, float("nan"), 0.8]
    specific = [True, False, True, True, True, True]
    result = good_but_specific(scores, specific, threshold=0.8)
    # Scored: 5 (the NaN dropped). Good (> 0.8, strict): 0.9, 0.85, 0.95 -> 3.
    # Seed-specific among scored: 0.9, 0.5, 0.95, 0.8 -> 4; good and specific: 2.
    assert (result.n_scored, result.n_good, result.n_seed_specific) == (5, 3, 4)
    assert result.n_good_seed_specific == 2
    assert result.fraction_of_good == pytest.approx(2 / 3)
    assert result.fraction_of_seed_specific == pytest.approx(2 / 4)
    assert result.fraction_of_scored == pytest.approx(2 / 5)
    assert good_but_specific([], []).fraction_of_good is None


def test_specificity_gap_marks_informative_and_uninformative():
    rng = np.random.default_rng(0)
    shuffled = rng.uniform(0.4, 0.6, 40)
    working = specificity_gap(shuffled + 0.3, shuffled)
    assert working.informative is True
    assert working.gap.mean == pytest.approx(0.3)
    assert working.n == 40
    # A scorer whose own scores are as random as its shuffled ones: the gap's CI covers 0.
    noise = specificity_gap(rng.uniform(0.4, 0.6, 40), shuffled)
    assert noise.informative is False
    assert noise.gap.ci_low is not None and noise.gap.ci_low < 0
    # Pairs need both scores; too few pairs give no verdict.
    few = specificity_gap([0.9, 0.9, math.nan, 0.9], [0.5, 0.5, 0.5, math.nan])
    assert few.n == 2 and few.informative is None
    with pytest.raises(ValueError):
        specificity_gap([0.1, 0.2], [0.1])


def test_holm_by_hand():
    # m = 4: sorted 0.01 * 4 = 0.04; 0.03 * 3 = 0.09; 0.04 * 2 = 0.08 -> raised to 0.09 (the
    # adjusted values never decrease); 0.5 * 1 = 0.5. A missing test stays out of the family.
    adjusted = holm([0.01, 0.04, None, 0.03, 0.5])
    assert adjusted == pytest.approx([0.04, 0.09, None, 0.09, 0.5])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert holm([]) == []


def test_match_groups_are_the_unit_not_each_seed_copy():
    """Four shared features, each found in three seeds (three latents with one score), against
    four seed-specific latents: four units a side, not twelve against four."""
    shared_scores = [0.9, 0.8, 0.85, 0.75]
    specific_scores = [0.7, 0.6, 0.65, 0.72]
    scores = np.array(shared_scores * 3 + specific_scores)
    groups = np.array([0, 1, 2, 3] * 3 + [4, 5, 6, 7])
    ids, means, counts = unit_means(scores, groups)
    assert ids.tolist() == list(range(8)) and counts.tolist() == [3] * 4 + [1] * 4
    np.testing.assert_allclose(means, shared_scores + specific_scores)
    labels = np.arange(8) < 4
    result = stratified_difference(means, labels, bootstrap=Bootstrap(n_resamples=4000))
    assert (result.n_units, result.n_strata) == (8, 1)
    assert result.difference == pytest.approx(np.mean(shared_scores) - np.mean(specific_scores))
    # Exact: the observed split is the most extreme of C(8, 4) = 70, on each side: p = 2 / 70.
    assert result.p_value == pytest.approx(2 / 70, abs=0.012)
    assert result.ci_low is not None and result.ci_high is not None
    assert 0 < result.ci_low < result.difference < result.ci_high
    # Pooling the three copies as independent latents claims far more certainty.
    pooled = compare_groups(scores[:12], scores[12:])
    assert pooled.p_value is not None and pooled.p_value < result.p_value / 5


def test_frequency_adjusted_difference_removes_a_frequency_confound():
    """Scores follow firing frequency only, and shared units fire more often: the plain
    difference is large, the difference within frequency bins is none."""
    rng = np.random.default_rng(1)
    level = rng.integers(0, 5, 400)
    shared = rng.random(400) < 0.15 + 0.17 * level
    scores = 0.5 + 0.08 * level + rng.normal(0, 0.02, 400)
    plain = stratified_difference(scores, shared)
    adjusted = stratified_difference(scores, shared, quantile_bins(level, 5))
    assert plain.difference is not None and plain.difference > 0.05
    assert plain.p_value is not None and plain.p_value < 0.01
    assert adjusted.n_strata == 5 and adjusted.n_units == 400
    assert adjusted.difference == pytest.approx(0.0, abs=0.01)
    assert adjusted.ci_low is not None and adjusted.ci_high is not None
    assert adjusted.ci_low < 0 < adjusted.ci_high
    assert adjusted.p_value is not None and adjusted.p_value > 0.05


def test_strata_without_both_classes_carry_no_weight():
    # Frequency separates the classes completely: nothing is left to compare.
    none = stratified_difference([0.9, 0.8, 0.3, 0.2], [True, True, False, False], [1, 1, 0, 0])
    assert none.n_strata == 0 and none.difference is None and none.p_value is None
    assert (none.n_shared, none.n_seed_specific) == (0, 0)
    # One mixed stratum: the difference is its own.
    one = stratified_difference(
        [0.9, 0.5, 0.8, 0.3, 0.2, math.nan],
        [True, False, True, False, False, True],
        [1] * 3 + [0] * 3,
    )
    assert (one.n_units, one.n_strata, one.n_shared, one.n_seed_specific) == (5, 1, 2, 1)
    assert one.difference == pytest.approx(0.85 - 0.5)


def test_quantile_bins_have_equal_counts_and_merge_ties():
    bins = quantile_bins(np.arange(10.0), 5)
    assert np.bincount(bins.astype(int)).tolist() == [2] * 5
    tied = quantile_bins([1.0, 1.0, 1.0, 1.0, 2.0, math.nan], 4)
    assert np.isnan(tied[-1]) and len(set(tied[:-1].tolist())) == 2


def test_one_stratum_agrees_with_scipys_permutation_test_and_bootstrap():
    """The reference: with one stratum, the test is scipy's two-sample permutation test of the
    difference of means and the interval scipy's two-sample percentile bootstrap."""
    from scipy import stats

    rng = np.random.default_rng(5)
    shared, specific = rng.normal(0.62, 0.1, 30), rng.normal(0.57, 0.1, 45)
    values = np.concatenate([shared, specific])
    labels = np.arange(values.size) < shared.size
    ours = stratified_difference(values, labels, bootstrap=Bootstrap(n_resamples=20000))

    def difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    reference = stats.permutation_test(
        (shared, specific), difference, n_resamples=20000, vectorized=True, rng=1
    )
    interval = stats.bootstrap(
        (shared, specific), difference, n_resamples=20000, method="percentile", rng=1
    ).confidence_interval
    assert ours.difference == pytest.approx(difference(shared, specific))
    assert ours.p_value == pytest.approx(reference.pvalue, abs=0.01)
    assert (ours.ci_low, ours.ci_high) == pytest.approx((interval.low, interval.high), abs=0.005)
