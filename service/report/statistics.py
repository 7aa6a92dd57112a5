"""The report's statistics, on plain numpy arrays: summaries with bootstrap confidence
intervals, two-group comparisons (Mann-Whitney U), Spearman correlations, the share of
latents that score well yet are seed-specific, the specificity control's gap, and the test of
shared against seed-specific interpretability: a difference of means over units (match
groups), optionally within strata (firing-frequency bins), with a bootstrap CI and a
permutation p-value, and Holm's adjustment for the family of such tests.

Every function drops values that are not finite (an unscored latent, an unmatched one) and
answers None where a number cannot be computed from what is left, instead of raising or
returning NaN: a report on a half-finished run must still render. Bootstrap intervals and
permutations use a seeded generator, so the same data always give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field
from scipy import stats

from service.config import ReportConfig

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
# Fewer paired latents than this and the control gives no verdict (its interval means little).
MIN_CONTROL_LATENTS = ReportConfig.model_fields["min_control_latents"].default
BOOTSTRAP_BATCH_VALUES = 5_000_000


@dataclass(frozen=True)
class Bootstrap:
    """How confidence intervals are drawn: level, resamples and the generator's seed."""

    confidence: float = DEFAULT_CONFIDENCE
    n_resamples: int = DEFAULT_RESAMPLES
    seed: int = 0


DEFAULT_BOOTSTRAP = Bootstrap()


class Summary(BaseModel):
    """Count, mean, median and a bootstrap confidence interval of the mean."""

    n: int
    mean: float | None = None
    median: float | None = None
    ci_low: float | None = Field(default=None, description="bootstrap CI of the mean, low end")
    ci_high: float | None = None


class Comparison(BaseModel):
    """Shared against seed-specific latents on one score."""

    shared: Summary
    seed_specific: Summary
    difference: float | None = Field(default=None, description="mean shared - mean seed-specific")
    mann_whitney_u: float | None = Field(default=None, description="U of the shared sample")
    p_value: float | None = Field(default=None, description="two-sided Mann-Whitney U")


class Correlation(BaseModel):
    """Spearman rank correlation over the latents where both values are known."""

    n: int
    rho: float | None = None
    p_value: float | None = None


class GoodButSpecific(BaseModel):
    """Latents that score above `threshold` although no other seed has them."""

    threshold: float
    n_scored: int = Field(description="latents with a score and a known shared status")
    n_good: int
    n_seed_specific: int
    n_good_seed_specific: int
    fraction_of_good: float | None = Field(description="good latents that are seed-specific")
    fraction_of_seed_specific: float | None = Field(
        description="seed-specific latents that score well"
    )
    fraction_of_scored: float | None


class SpecificityGap(BaseModel):
    """A scorer's own-explanation score against its score for another latent's explanation,
    paired per latent. Informative when the gap's confidence interval lies above zero."""

    n: int = Field(description="latents scored with both their own and a shuffled explanation")
    own: Summary
    shuffled: Summary
    gap: Summary = Field(description="own - shuffled, per latent")
    informative: bool | None = Field(description="None: too few latents for a verdict")


def finite(values: npt.ArrayLike) -> np.ndarray:
    """The finite values of `values` as float64."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def bootstrap_ci(
    values: npt.ArrayLike, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap), or None under two
    values. Percentile rather than BCa: BCa is undefined when every value is equal, which
    happens (a scorer that gives 0.5 to everything)."""
    data = finite(values)
    if data.size < 2:
        return None
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    result = stats.bootstrap(
        (data,),
        np.mean,
        confidence_level=bootstrap.confidence,
        n_resamples=bootstrap.n_resamples,
        method="percentile",
        vectorized=True,
        # Resamples are drawn in batches of about BOOTSTRAP_BATCH_VALUES values: all 2,000
        # resamples of 100,000 scores at once would take gigabytes.
        batch=max(1, BOOTSTRAP_BATCH_VALUES // data.size),
        rng=np.random.default_rng(bootstrap.seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def summarize(values: npt.ArrayLike, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> Summary:
    """Count, mean, median and bootstrap CI of the finite values."""
    data = finite(values)
    if data.size == 0:
        return Summary(n=0)
    interval = bootstrap_ci(data, bootstrap)
    return Summary(
        n=int(data.size),
        mean=float(data.mean()),
        median=float(np.median(data)),
        ci_low=interval[0] if interval else None,
        ci_high=interval[1] if interval else None,
    )


def compare_groups(
    shared: npt.ArrayLike, seed_specific: npt.ArrayLike, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP
) -> Comparison:
    """Summaries of both groups, the difference of means and a two-sided Mann-Whitney U."""
    first, second = finite(shared), finite(seed_specific)
    comparison = Comparison(
        shared=summarize(first, bootstrap), seed_specific=summarize(second, bootstrap)
    )
    if first.size and second.size:
        comparison.difference = float(first.mean() - second.mean())
        test = stats.mannwhitneyu(first, second, alternative="two-sided")
        comparison.mann_whitney_u = float(test.statistic)
        comparison.p_value = float(test.pvalue)
    return comparison


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> Correlation:
    """Spearman's rho and its p-value over pairs where both are finite (None under three, or
    when either side is constant)."""
    first = np.asarray(x, dtype=np.float64).ravel()
    second = np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(first) & np.isfinite(second)
    first, second = first[keep], second[keep]
    correlation = Correlation(n=int(keep.sum()))
    if first.size < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        return correlation
    result = stats.spearmanr(first, second)
    correlation.rho = float(result.statistic)
    correlation.p_value = float(result.pvalue)
    return correlation


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def good_but_specific(
    scores: npt.ArrayLike, seed_specific: npt.ArrayLike, threshold: float = 0.8
) -> GoodButSpecific:
    """How many latents score above `threshold` (strictly) yet are seed-specific.

    `seed_specific` is a boolean per latent; latents with a non-finite score are left out."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    specific = np.asarray(seed_specific, dtype=bool).ravel()
    keep = np.isfinite(values)
    values, specific = values[keep], specific[keep]
    good = values > threshold
    n_good_specific = int((good & specific).sum())
    return GoodButSpecific(
        threshold=threshold,
        n_scored=int(values.size),
        n_good=int(good.sum()),
        n_seed_specific=int(specific.sum()),
        n_good_seed_specific=n_good_specific,
        fraction_of_good=_ratio(n_good_specific, int(good.sum())),
        fraction_of_seed_specific=_ratio(n_good_specific, int(specific.sum())),
        fraction_of_scored=_ratio(n_good_specific, int(values.size)),
    )


def specificity_gap(
    own: npt.ArrayLike,
    shuffled: npt.ArrayLike,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
    min_latents: int = MIN_CONTROL_LATENTS,
) -> SpecificityGap:
    """The paired gap own - shuffled per latent (arrays aligned by latent) with a bootstrap
    CI; `informative` is True when the CI's low end is above zero, False when it is not, and
    None with fewer than `min_latents` latents scored both ways."""
    first = np.asarray(own, dtype=np.float64).ravel()
    second = np.asarray(shuffled, dtype=np.float64).ravel()
    if first.shape != second.shape:
        raise ValueError("own and shuffled scores must be aligned per latent")
    keep = np.isfinite(first) & np.isfinite(second)
    gap = summarize(first[keep] - second[keep], bootstrap)
    informative: bool | None = None
    if gap.n >= min_latents and gap.ci_low is not None:
        informative = gap.ci_low > 0
    return SpecificityGap(
        n=int(keep.sum()),
        own=summarize(first[keep], bootstrap),
        shuffled=summarize(second[keep], bootstrap),
        gap=gap,
        informative=informative,
    )


class StratifiedDifference(BaseModel):
    """Shared minus seed-specific mean over units (match groups), within strata, weighted."""

    n_units: int = Field(description="units with a score: match groups")
    n_strata: int = Field(description="strata holding both shared and seed-specific units")
    n_shared: int = Field(default=0, description="shared units in those strata")
    n_seed_specific: int = Field(default=0, description="seed-specific units in those strata")
    difference: float | None = Field(
        default=None,
        description="sum over strata of w * (shared mean - seed-specific mean), "
        "w proportional to n_shared * n_specific / (n_shared + n_specific)",
    )
    ci_low: float | None = Field(default=None, description="bootstrap over units, per stratum")
    ci_high: float | None = None
    p_value: float | None = Field(
        default=None, description="two-sided permutation test, labels permuted within strata"
    )


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the
    family and None in the answer). Controls the family-wise error rate at any dependence."""
    present = [(p, index) for index, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(sorted(present)):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def _permuted_differences(
    cells: list[tuple[float, np.ndarray, int]],
    n_permutations: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The weighted difference under `n_permutations` shuffles of the labels within each
    stratum, given per stratum (weight, its values, how many of them are shared)."""
    result = np.zeros(n_permutations)
    for weight, inside, n_shared in cells:
        total = inside.sum()
        batch = max(1, BOOTSTRAP_BATCH_VALUES // inside.size)
        for start in range(0, n_permutations, batch):
            count = min(batch, n_permutations - start)
            labels = np.zeros((count, inside.size))
            labels[:, :n_shared] = 1.0
            shared_sum = rng.permuted(labels, axis=1) @ inside
            difference = shared_sum / n_shared - (total - shared_sum) / (inside.size - n_shared)
            result[start : start + count] += weight * difference
    return result


def _bootstrap_differences(
    cells: list[tuple[float, np.ndarray, np.ndarray]], n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The weighted difference with each stratum's shared and seed-specific values resampled
    apart, given per stratum (weight, shared values, seed-specific values)."""
    result = np.zeros(n_resamples)
    for weight, shared, specific in cells:
        for cell, sign in ((shared, 1.0), (specific, -1.0)):
            batch = max(1, BOOTSTRAP_BATCH_VALUES // cell.size)
            for start in range(0, n_resamples, batch):
                count = min(batch, n_resamples - start)
                draws = cell[rng.integers(0, cell.size, (count, cell.size))].mean(axis=1)
                result[start : start + count] += sign * weight * draws
    return result


def stratified_difference(
    values: npt.ArrayLike,
    shared: npt.ArrayLike,
    strata: npt.ArrayLike | None = None,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
) -> StratifiedDifference:
    """Shared against seed-specific units (one value per unit, such as a match group's mean
    score), compared within strata (such as firing-frequency bins; None: one stratum), with a
    percentile bootstrap CI (units resampled within each stratum and class) and a two-sided
    permutation p-value (labels shuffled within strata, `bootstrap.n_resamples` times).

    Units with a non-finite value or stratum are left out; a stratum without both classes
    carries no weight. Weights n_shared * n_specific / (n_shared + n_specific), normalised,
    favour the strata that hold the most information about the difference (as
    Cochran-Mantel-Haenszel does)."""
    value = np.asarray(values, dtype=np.float64).ravel()
    label = np.asarray(shared, dtype=bool).ravel()
    stratum = (
        np.zeros(value.size) if strata is None else np.asarray(strata, dtype=np.float64).ravel()
    )
    keep = np.isfinite(value) & np.isfinite(stratum)
    value, label, stratum = value[keep], label[keep], stratum[keep]
    mixed = []
    for name in np.unique(stratum):
        inside = stratum == name
        first, second = value[inside & label], value[inside & ~label]
        if first.size and second.size:
            mixed.append((first.size * second.size / (first.size + second.size), first, second))
    result = StratifiedDifference(
        n_units=int(value.size),
        n_strata=len(mixed),
        n_shared=sum(first.size for _, first, _ in mixed),
        n_seed_specific=sum(second.size for _, _, second in mixed),
    )
    if not mixed:
        return result
    total = sum(weight for weight, _, _ in mixed)
    cells = [(weight / total, first, second) for weight, first, second in mixed]
    observed = float(sum(w * (first.mean() - second.mean()) for w, first, second in cells))
    result.difference = observed
    rng = np.random.default_rng(bootstrap.seed)
    resampled = _bootstrap_differences(cells, bootstrap.n_resamples, rng)
    tail = (1 - bootstrap.confidence) / 2
    result.ci_low = float(np.quantile(resampled, tail))
    result.ci_high = float(np.quantile(resampled, 1 - tail))
    permuted = _permuted_differences(
        [(w, np.concatenate([first, second]), first.size) for w, first, second in cells],
        bootstrap.n_resamples,
        rng,
    )
    # Ties with the observed difference count as at least as extreme; the +1s keep the
    # p-value valid for a finite number of permutations (never 0).
    extreme = np.abs(permuted) >= abs(observed) - 1e-12
    result.p_value = float((1 + extreme.sum()) / (1 + bootstrap.n_resamples))
    return result


def unit_means(
    values: npt.ArrayLike, units: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit ids, mean of each unit's finite values, count of them) over the units that have
    any: one number per match group from the scores of its latents."""
    value = np.asarray(values, dtype=np.float64).ravel()
    unit = np.asarray(units, dtype=np.int64).ravel()
    keep = np.isfinite(value)
    ids, inverse = np.unique(unit[keep], return_inverse=True)
    counts = np.bincount(inverse, minlength=ids.size)
    sums = np.bincount(inverse, weights=value[keep], minlength=ids.size)
    return ids, sums / np.maximum(counts, 1), counts


def quantile_bins(values: npt.ArrayLike, n_bins: int) -> np.ndarray:
    """Bin of each value among `n_bins` bins of about equal count, by rank (NaN stays NaN);
    equal values share a bin, so ties may leave bins empty."""
    value = np.asarray(values, dtype=np.float64).ravel()
    bins = np.full(value.size, np.nan)
    finite = np.isfinite(value)
    if finite.any():
        ranks = stats.rankdata(value[finite], method="average") - 1
        bins[finite] = np.floor(ranks * n_bins / finite.sum())
    return bins
