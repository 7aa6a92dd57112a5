"""The random-model baseline: a run's latent scores beside those of its random-model control.

SAEs trained on a transformer with random weights score about as "interpretable" as SAEs of
the trained model under open autointerp pipelines (Heap et al., 2025), so a score means
something only beside that baseline. The control is the same study (seeds, hookpoints, SAE
config, data, latent selection) on the subject model with re-initialised weights, scored in
the same campaign (`autointerp run` with `random_model_seed`; `service.store.runs`).

Per hookpoint, explainer and scorer: each run's own-explanation scores summarised over its
latents (mean, median, bootstrap CI, as the shared vs seed-specific table does), and the test
of trained against random with the report's unit, the match group of each run (its latents'
mean score), plainly and within bins of log firing frequency pooled over both runs, each with
a bootstrap CI and a permutation p-value (`statistics.stratified_difference`, the run as the
label); Holm's adjustment runs over every such test of the report. The verdict comes from the
plain test's interval: above zero "better than a random model", containing zero "no better
than a random model", below zero "worse than a random model".
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from service.config import ReportConfig
from service.report.columns import Columns, group_values, log_frequency
from service.report.data import HookpointData, RunData, ScoreData
from service.report.statistics import (
    Bootstrap,
    SpecificityGap,
    StratifiedDifference,
    Summary,
    quantile_bins,
    specificity_gap,
    stratified_difference,
    summarize,
    unit_means,
)
from service.store.models import CONTROL_OWN, CONTROL_SHUFFLED

RANDOM_MODEL_TEST = (
    "match groups of each run as units (a shared latent with its partners in every seed, or a "
    "seed-specific latent alone), each scored by its latents' mean; trained minus random-model "
    "difference of means, bootstrap CI over groups, two-sided permutation test of the run "
    "labels over groups"
)
RANDOM_MODEL_FREQUENCY_TEST = (
    "the same match groups within bins of equal count of the group's mean log firing "
    "frequency (bins over both runs' groups); weighted mean of the per-bin differences "
    "(weights n_trained * n_random / n), bootstrap CI within bins, two-sided permutation test "
    "of the run labels within bins"
)
BETTER = "better than a random model"
NO_BETTER = "no better than a random model"
WORSE = "worse than a random model"


class RandomModelBaseline(BaseModel):
    """The control run the report compares against."""

    run: str = Field(description="the random-model control run")
    subject_model: str = Field(description="its recorded model spec, NAME@random:SEED")
    model: str = Field(description="the same, in words")
    n_tests: int = Field(default=0, description="trained vs random tests with a p-value: Holm")


class RandomModelTest(BaseModel):
    """Trained minus random-model mean over match groups, within strata, weighted."""

    test: str
    n_permutations: int
    n_units: int = Field(description="match groups with a score, both runs")
    n_strata: int = Field(description="strata holding groups of both runs")
    n_trained: int = Field(description="trained-model groups in those strata")
    n_random: int = Field(description="random-model groups in those strata")
    difference: float | None = Field(default=None, description="trained - random")
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_holm: float | None = Field(
        default=None, description="Holm-adjusted over every trained vs random test of the report"
    )

    @classmethod
    def of(cls, result: StratifiedDifference, test: str, n_permutations: int) -> RandomModelTest:
        # stratified_difference labels its classes shared / seed-specific: here the first
        # class is the trained model's groups, the second the random model's.
        return cls(
            test=test,
            n_permutations=n_permutations,
            n_units=result.n_units,
            n_strata=result.n_strata,
            n_trained=result.n_shared,
            n_random=result.n_seed_specific,
            difference=result.difference,
            ci_low=result.ci_low,
            ci_high=result.ci_high,
            p_value=result.p_value,
        )


class RandomModelRow(BaseModel):
    """One explainer with one scorer at one hookpoint: the trained model's latents against the
    random model's."""

    explainer: str
    scorer: str
    metric: str
    trained: Summary = Field(description="the trained model's latents with an own score")
    random: Summary = Field(description="the random model's latents with an own score")
    random_undefined: dict[str, int] = Field(
        default_factory=dict,
        description="random-model latents whose metric is undefined (NULL), by reason",
    )
    random_control: SpecificityGap | None = Field(
        default=None, description="the random model's own vs shuffled explanations"
    )
    by_match_group: RandomModelTest | None = Field(
        default=None, description="None: the random model has no scores of this pair"
    )
    frequency_adjusted: RandomModelTest | None = Field(
        default=None, description="None: no scores or no firing frequencies"
    )
    verdict: str | None = Field(
        default=None,
        description=f"from the match-group test's CI: {BETTER!r}, {NO_BETTER!r} (the CI holds "
        f"0) or {WORSE!r}; None: no interval",
    )

    def undefined_text(self) -> str:
        """'no negatives: 3; nothing parsed: 1'; empty when every metric was defined."""
        return "; ".join(
            f"{reason}: {count:,}" for reason, count in sorted(self.random_undefined.items())
        )


def verdict(test: RandomModelTest | None) -> str | None:
    """What the interval of trained - random says, in words; None without an interval."""
    if test is None or test.ci_low is None or test.ci_high is None:
        return None
    if test.ci_low > 0:
        return BETTER
    if test.ci_high < 0:
        return WORSE
    return NO_BETTER


class _RunColumns:
    """One run's hookpoint: its columns, match groups and per-latent log frequency."""

    def __init__(self, group: HookpointData):
        self.group = group
        self.columns = Columns(group)
        self.log_frequency = log_frequency(
            self.columns.gather({s: sae.firing_frequency for s, sae in group.saes.items()})
        )

    def in_group(self, scores: ScoreData) -> ScoreData:
        return scores.for_saes(sae.id for sae in self.group.saes.values())

    def units(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean score, mean log frequency) of each match group with a score."""
        groups = self.columns.match_groups
        scored = np.isfinite(values)
        ids, means, _ = unit_means(values[scored], groups[scored])
        return means, group_values(self.log_frequency, groups, ids)


def _tests(
    trained: tuple[np.ndarray, np.ndarray],
    random: tuple[np.ndarray, np.ndarray],
    config: ReportConfig,
) -> tuple[RandomModelTest, RandomModelTest | None]:
    bootstrap = Bootstrap(config.confidence, config.n_resamples, config.seed)
    values = np.concatenate([trained[0], random[0]])
    is_trained = np.concatenate([np.ones(trained[0].size, bool), np.zeros(random[0].size, bool)])
    plain = RandomModelTest.of(
        stratified_difference(values, is_trained, None, bootstrap),
        RANDOM_MODEL_TEST,
        config.n_resamples,
    )
    frequency = np.concatenate([trained[1], random[1]])
    if not np.isfinite(frequency).any():
        return plain, None
    bins = quantile_bins(frequency, config.frequency_bins)
    adjusted = RandomModelTest.of(
        stratified_difference(values, is_trained, bins, bootstrap),
        RANDOM_MODEL_FREQUENCY_TEST,
        config.n_resamples,
    )
    return plain, adjusted


def random_model_rows(
    group: HookpointData,
    data: RunData,
    control_group: HookpointData | None,
    control: RunData,
    config: ReportConfig,
) -> list[RandomModelRow]:
    """Per explainer and scorer the trained run scored at this hookpoint, its latents beside
    the control run's (same campaign) at the same hookpoint."""
    bootstrap = Bootstrap(config.confidence, config.n_resamples, config.seed)
    trained_side = _RunColumns(group)
    random_side = _RunColumns(control_group) if control_group is not None else None
    rows = []
    for own in sorted(data.score_sets(CONTROL_OWN), key=lambda s: (s.scorer, s.explainer)):
        own = trained_side.in_group(own)
        if not own.sae_id.size:
            continue
        trained_values = trained_side.columns.scores(own)
        row = RandomModelRow(
            explainer=own.explainer,
            scorer=own.scorer,
            metric=own.metric,
            trained=summarize(trained_values, bootstrap),
            random=Summary(n=0),
        )
        rows.append(row)
        other = control.find_scores(own.explainer, own.scorer, CONTROL_OWN)
        if random_side is None or other is None:
            continue
        other = random_side.in_group(other)
        random_values = random_side.columns.scores(other)
        row.random = summarize(random_values, bootstrap)
        row.random_undefined = ScoreData.undefined_counts(other.undefined_reason)
        shuffled = control.find_scores(own.explainer, own.scorer, CONTROL_SHUFFLED)
        if shuffled is not None:
            row.random_control = specificity_gap(
                random_values,
                random_side.columns.scores(random_side.in_group(shuffled)),
                bootstrap,
                min_latents=config.min_control_latents,
            )
        row.by_match_group, row.frequency_adjusted = _tests(
            trained_side.units(trained_values), random_side.units(random_values), config
        )
        row.verdict = verdict(row.by_match_group)
    return rows
