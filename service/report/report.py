"""The report itself: what `autointerp report` computes from a run's data, as pydantic models
(so `--json` is `model_dump_json`), and the list of what is missing from the run.

Per hookpoint: shared and seed-specific counts for every ordered pair of seeds; the
multi-seed "present in exactly m SAEs" table; per explainer and scorer, the specificity
control (own vs shuffled explanation), shared vs seed-specific interpretability, score
against firing frequency and against matched similarity, the share of latents that score
well yet are seed-specific and the score by presence count; explanation agreement; and
cross-seed scoring (explanation of a latent's partner in another seed, scored on the latent),
split by whether the latent is shared with that partner's seed; and, when the run has a
random-model control, its scores beside the control's (`random_model`).

A latent is *shared* here when it is shared with at least one other seed of its hookpoint
(the same test as the stratified queue); *seed-specific* when it was matched against other
seeds and is shared with none. Its *matched similarity* is the best, over other seeds, of the
smaller of its two matched cosines, so shared means matched similarity > threshold.

The test of shared against seed-specific scores never counts a shared latent and its
partners as independent: its unit is the *match group* (the connected "shared with" latents
across seeds, or a seed-specific latent alone), scored by the mean of its latents. It is
made plainly and within bins of the group's log firing frequency (frequency drives both
sharing and scores), each with a bootstrap CI and a permutation p-value; Holm's adjustment
runs over every such test of the report (each explainer x scorer x hookpoint, both kinds).
The comparison within each base seed's latents is shown beside, unadjusted.

A scorer whose control fails (`informative` False) keeps its numbers in the JSON, flagged,
but its comparison is stated as uninformative wherever a person reads the report.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, Field

from sae.matching.multiseed import presence_statistics
from sae.model_spec import describe_model, parse_model_spec
from service.config import ReportConfig
from service.report.agreement import AgreementSection, Embed, explanation_agreement
from service.report.columns import Columns, group_values, log_frequency
from service.report.compare import CampaignComparison
from service.report.data import (
    HookpointData,
    RunData,
    SaeData,
    ScoreData,
)
from service.report.random_model import (
    RandomModelBaseline,
    RandomModelRow,
    RandomModelTest,
    random_model_rows,
)
from service.report.statistics import (
    Bootstrap,
    Comparison,
    Correlation,
    GoodButSpecific,
    SpecificityGap,
    StratifiedDifference,
    Summary,
    compare_groups,
    finite,
    good_but_specific,
    holm,
    quantile_bins,
    spearman,
    specificity_gap,
    stratified_difference,
    summarize,
    unit_means,
)
from service.store.models import CONTROL_CROSS_SEED, CONTROL_OWN, CONTROL_SHUFFLED


def bootstrap_of(config: ReportConfig) -> Bootstrap:
    """The bootstrap the report's confidence intervals use."""
    return Bootstrap(config.confidence, config.n_resamples, config.seed)


class PairCounts(BaseModel):
    """Seed a's latents matched into seed b."""

    seed_a: int
    seed_b: int
    n_latents: int
    threshold: float
    shared: int
    seed_specific: int
    shared_fraction: float
    shared_decoder_only: int
    encoder_decoder_agreement: float
    mean_cos_decoder: float | None
    mean_cos_encoder: float | None
    derived: bool = Field(description="computed by inverting the stored b-into-a matching")


class PresenceRow(BaseModel):
    m: int = Field(description="number of SAEs the latent is present in (itself included)")
    mean_latents: float
    fraction: float
    only_in_base_fraction: float = Field(
        description="fraction found only in the base SAE among m SAEs (base + m-1 others)"
    )


MATCH_GROUP_TEST = (
    "match groups as units (a shared latent with its partners in every seed, or a "
    "seed-specific latent alone), each scored by its latents' mean; difference of means, "
    "bootstrap CI over groups, two-sided permutation test of the labels over groups"
)
FREQUENCY_ADJUSTED_TEST = (
    "the same match groups within bins of equal count of the group's mean log firing "
    "frequency; weighted mean of the per-bin differences (weights n_shared * n_specific / n), "
    "bootstrap CI within bins, two-sided permutation test of the labels within bins"
)
PER_SEED_TEST = "latents of one base SAE (each a distinct latent), two-sided Mann-Whitney U"


class SharingTest(StratifiedDifference):
    """One test of shared against seed-specific interpretability, and how it was made."""

    test: str
    n_permutations: int
    p_holm: float | None = Field(
        default=None,
        description="Holm-adjusted over every shared vs seed-specific test of the report",
    )


class SeedComparison(BaseModel):
    """Shared against seed-specific latents of one base seed."""

    seed: int
    test: str = PER_SEED_TEST
    comparison: Comparison


class ScorerSection(BaseModel):
    """One explainer with one scorer, on the latents of one hookpoint."""

    explainer: str
    scorer: str
    metric: str
    scored: Summary = Field(description="every latent with an own-explanation score")
    failed_answer_rate: float | None = Field(description="unparsed answers / answers asked")
    undefined: dict[str, int] = Field(
        default_factory=dict,
        description="latents whose metric is undefined (NULL), by reason: 'no negatives', ...",
    )
    control: SpecificityGap | None = Field(description="None: no shuffled-explanation scores")
    informative: bool | None
    shared_vs_specific: Comparison | None = Field(
        description="latent-level summaries of both groups (no test: latents of all seeds "
        "pooled are not independent; see by_match_group); None: no matchings stored"
    )
    by_match_group: SharingTest | None = Field(
        default=None, description="the test, match groups as the unit; None: no matchings"
    )
    frequency_adjusted: SharingTest | None = Field(
        default=None,
        description="the same, within firing-frequency bins; None: no matchings or frequencies",
    )
    per_seed: list[SeedComparison] = Field(
        default_factory=list, description="the comparison within each base seed's latents"
    )
    vs_firing_frequency: Correlation
    vs_matched_similarity: Correlation | None
    good_but_specific: GoodButSpecific | None
    by_presence: list[Summary] | None = Field(
        description="[m-1]: scores of latents present in exactly m SAEs"
    )

    def undefined_text(self) -> str:
        """'no negatives: 3; nothing parsed: 1'; empty when every metric was defined."""
        return "; ".join(f"{reason}: {count:,}" for reason, count in sorted(self.undefined.items()))


class CrossSeedSection(BaseModel):
    """Explanations written for a latent's matched partner in another seed, scored on the
    latent. Split by whether the latent is shared with the partner's seed: does a
    seed-specific latent's partner explanation transfer worse?"""

    explainer: str
    scorer: str
    cross_seed: Summary
    own: Summary = Field(description="the same latents scored with their own explanations")
    gap: Summary = Field(description="own - cross-seed, per latent")
    cross_seed_shared_vs_specific: Comparison | None = Field(
        description="cross-seed scores of latents shared with the partner's seed against "
        "seed-specific ones; None: no matching of the two seeds stored"
    )
    gap_shared_vs_specific: Comparison | None = Field(
        description="own - cross-seed gap, shared against seed-specific latents"
    )


class HookpointReport(BaseModel):
    hookpoint: str
    seeds: list[int]
    n_latents: dict[int, int]
    firing_statistics: bool
    pairs: list[PairCounts]
    presence: list[PresenceRow] | None
    scorers: list[ScorerSection]
    agreement: list[AgreementSection]
    cross_seed: list[CrossSeedSection]
    random_model: list[RandomModelRow] = Field(
        default_factory=list,
        description="per explainer and scorer, these latents beside the random-model control's",
    )


class Report(BaseModel):
    run: str
    subject_model: str
    dataset: str
    architecture: str
    k: int | None
    seeds: list[int]
    n_examples: int
    config: ReportConfig
    hookpoints: list[HookpointReport]
    missing: list[str] = Field(description="what the run lacks, and the command that adds it")
    campaign: str | None = Field(
        default=None, description="the one campaign every explanation and score comes from"
    )
    comparison: CampaignComparison | None = Field(
        default=None, description="another campaign's scores beside these (--compare)"
    )
    n_sharing_tests: int = Field(
        default=0, description="shared vs seed-specific tests with a p-value: Holm's family"
    )
    random_model: RandomModelBaseline | None = Field(
        default=None, description="the random-model control run the scores are set beside"
    )


def _mean_or_none(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def pair_counts(group: HookpointData) -> list[PairCounts]:
    rows = []
    for (seed_a, seed_b), pair in sorted(group.pairs.items()):
        shared = pair.shared
        n = shared.size
        rows.append(
            PairCounts(
                seed_a=seed_a,
                seed_b=seed_b,
                n_latents=n,
                threshold=pair.threshold,
                shared=int(shared.sum()),
                seed_specific=int(n - shared.sum()),
                shared_fraction=float(shared.mean()) if n else 0.0,
                shared_decoder_only=int(pair.decoder_only.sum()),
                encoder_decoder_agreement=float(pair.agree.mean()) if n else 0.0,
                mean_cos_decoder=_mean_or_none(pair.cos_decoder),
                mean_cos_encoder=_mean_or_none(pair.cos_encoder),
                derived=pair.derived,
            )
        )
    return rows


def presence_table(group: HookpointData) -> list[PresenceRow] | None:
    """The multi-seed table from the stored matchings; None unless every pair of seeds is
    matched and all SAEs have one size."""
    seeds = group.seeds
    sizes = {group.saes[seed].n_latents for seed in seeds}
    complete = all((a, b) in group.pairs for a in seeds for b in seeds if a != b)
    if len(seeds) < 2 or len(sizes) != 1 or not complete:
        return None
    n_latents = sizes.pop()
    shared = {key: pair.shared for key, pair in group.pairs.items()}
    exactly, only_in_base = presence_statistics(shared, seeds)
    return [
        PresenceRow(
            m=m,
            mean_latents=count,
            fraction=count / max(n_latents, 1),
            only_in_base_fraction=only,
        )
        for m, (count, only) in enumerate(zip(exactly, only_in_base, strict=True), start=1)
    ]


def presence_counts(group: HookpointData, seed: int) -> np.ndarray | None:
    """Per latent of `seed`: in how many SAEs it is present (itself plus those sharing it);
    None unless it was matched against every other seed."""
    others = [other for other in group.seeds if other != seed]
    if not others or any((seed, other) not in group.pairs for other in others):
        return None
    present = np.ones(group.saes[seed].n_latents, dtype=np.int64)
    for other in others:
        present += group.pairs[(seed, other)].shared
    return present


def _sharing_tests(
    values: np.ndarray,
    known: np.ndarray,
    shared: np.ndarray,
    frequency: np.ndarray,
    groups: np.ndarray,
    config: ReportConfig,
) -> tuple[SharingTest, SharingTest | None]:
    """Shared vs seed-specific with match groups as units: plain, and within frequency bins
    (None when no latent has a firing frequency)."""
    bootstrap = bootstrap_of(config)
    scored = known & np.isfinite(values)
    ids, group_scores, _ = unit_means(values[scored], groups[scored])
    # A group is shared when its latents are (all of them, but for matchings stored both ways
    # that disagree: then any).
    group_shared = group_values(shared[scored].astype(np.float64), groups[scored], ids) > 0
    plain = stratified_difference(group_scores, group_shared, None, bootstrap)
    by_group = SharingTest(
        **plain.model_dump(), test=MATCH_GROUP_TEST, n_permutations=config.n_resamples
    )
    group_frequency = group_values(log_frequency(frequency), groups, ids)
    if not np.isfinite(group_frequency).any():
        return by_group, None
    bins = quantile_bins(group_frequency, config.frequency_bins)
    adjusted = stratified_difference(group_scores, group_shared, bins, bootstrap)
    return by_group, SharingTest(
        **adjusted.model_dump(), test=FREQUENCY_ADJUSTED_TEST, n_permutations=config.n_resamples
    )


def _scorer_section(
    group: HookpointData,
    columns: Columns,
    own: ScoreData,
    shuffled: ScoreData | None,
    config: ReportConfig,
) -> ScorerSection:
    bootstrap = bootstrap_of(config)
    values = columns.scores(own)
    control = None
    if shuffled is not None:
        control = specificity_gap(
            values,
            columns.scores(shuffled),
            bootstrap,
            min_latents=config.min_control_latents,
        )
    shared_any = {s: group.shared_any(s) for s in group.seeds}
    # Latents of a seed never matched against another have no shared status: left out.
    known = columns.gather(
        {s: np.ones(group.saes[s].n_latents) for s, mask in shared_any.items() if mask is not None},
        fill=0.0,
    ).astype(bool)
    shared = columns.gather(shared_any, fill=0.0).astype(bool)
    comparison = None
    good = None
    similarity = None
    by_group = adjusted = None
    per_seed = []
    frequency = columns.gather({s: sae.firing_frequency for s, sae in group.saes.items()})
    if known.any():
        shared_values, specific_values = values[known & shared], values[known & ~shared]
        comparison = Comparison(
            shared=summarize(shared_values, bootstrap),
            seed_specific=summarize(specific_values, bootstrap),
        )
        if comparison.shared.n and comparison.seed_specific.n:
            comparison.difference = float(
                finite(shared_values).mean() - finite(specific_values).mean()
            )
        good = good_but_specific(values[known], ~shared[known], config.good_threshold)
        similarity = spearman(
            columns.gather({s: group.matched_similarity(s) for s in group.seeds}), values
        )
        by_group, adjusted = _sharing_tests(
            values, known, shared, frequency, columns.match_groups, config
        )
        seed_of = np.concatenate(
            [np.full(group.saes[s].n_latents, s) for s in group.seeds] or [np.zeros(0)]
        )
        per_seed = [
            SeedComparison(
                seed=s,
                comparison=compare_groups(
                    values[known & shared & (seed_of == s)],
                    values[known & ~shared & (seed_of == s)],
                    bootstrap,
                ),
            )
            for s in group.seeds
            if shared_any[s] is not None
        ]
    presence = columns.gather({s: presence_counts(group, s) for s in group.seeds})
    by_presence = None
    if np.isfinite(presence).any():
        by_presence = [
            summarize(values[presence == m], bootstrap) for m in range(1, len(group.seeds) + 1)
        ]
    in_group = np.isin(own.sae_id, [sae.id for sae in group.saes.values()])
    n_examples = int(own.n_examples[in_group].sum())
    n_failed = int(own.n_failed[in_group].sum())
    undefined = ScoreData.undefined_counts(own.undefined_reason[in_group])
    return ScorerSection(
        explainer=own.explainer,
        scorer=own.scorer,
        metric=own.metric,
        scored=summarize(values, bootstrap),
        failed_answer_rate=n_failed / n_examples if n_examples else None,
        undefined=undefined,
        control=control,
        informative=control.informative if control else None,
        shared_vs_specific=comparison,
        by_match_group=by_group,
        frequency_adjusted=adjusted,
        per_seed=per_seed,
        vs_firing_frequency=spearman(frequency, values),
        vs_matched_similarity=similarity,
        good_but_specific=good,
        by_presence=by_presence,
    )


def _shared_with_source(group: HookpointData, sae: SaeData, rows: ScoreData) -> np.ndarray:
    """Per score row of `sae`: 1.0 when the scored latent is shared with the seed its
    explanation came from, 0.0 when seed-specific to it, NaN when that pair is unmatched."""
    seed_of = {other.id: seed for seed, other in group.saes.items()}
    shared = np.full(rows.latent_index.size, np.nan)
    for source_sae_id in np.unique(rows.source_sae_id).tolist():
        pair = group.pairs.get((sae.seed, seed_of.get(source_sae_id, -1)))
        if pair is None:
            continue
        from_source = rows.source_sae_id == source_sae_id
        shared[from_source] = pair.shared[rows.latent_index[from_source]]
    return shared


def _cross_seed_sections(
    group: HookpointData, data: RunData, config: ReportConfig
) -> list[CrossSeedSection]:
    """Each cross-seed score paired with the scored latent's own score (same explainer and
    scorer). A latent may be scored with the explanations of several seeds' partners: each
    such score is one pair, shared or seed-specific with respect to that partner's seed."""
    bootstrap = bootstrap_of(config)
    sections = []
    for cross in data.score_sets(CONTROL_CROSS_SEED):
        own = data.find_scores(cross.explainer, cross.scorer, CONTROL_OWN)
        cross_values, own_values, shared_values = [], [], []
        for sae in group.saes.values():
            rows = cross.for_sae(sae.id)
            cross_values.append(rows.value)
            own_dense = (
                own.for_sae(sae.id).dense(sae.n_latents)
                if own is not None
                else np.full(sae.n_latents, np.nan)
            )
            own_values.append(own_dense[rows.latent_index])
            shared_values.append(_shared_with_source(group, sae, rows))
        cross_all, own_all = np.concatenate(cross_values), np.concatenate(own_values)
        if not np.isfinite(cross_all).any():
            continue
        shared_all = np.concatenate(shared_values)
        both = np.isfinite(cross_all) & np.isfinite(own_all)
        gap_all = own_all - cross_all
        cross_by_sharing = gap_by_sharing = None
        if np.isfinite(shared_all).any():
            shared, specific = shared_all == 1, shared_all == 0
            cross_by_sharing = compare_groups(cross_all[shared], cross_all[specific], bootstrap)
            gap_by_sharing = compare_groups(
                gap_all[both & shared], gap_all[both & specific], bootstrap
            )
        sections.append(
            CrossSeedSection(
                explainer=cross.explainer,
                scorer=cross.scorer,
                cross_seed=summarize(cross_all, bootstrap),
                own=summarize(own_all[both], bootstrap),
                gap=summarize(gap_all[both], bootstrap),
                cross_seed_shared_vs_specific=cross_by_sharing,
                gap_shared_vs_specific=gap_by_sharing,
            )
        )
    return sections


def hookpoint_report(
    group: HookpointData,
    data: RunData,
    config: ReportConfig,
    embed: Embed | None,
    control: RunData | None = None,
) -> HookpointReport:
    columns = Columns(group)
    sae_ids = {sae.id for sae in group.saes.values()}
    scorers = []
    # By scorer first, so each LLM explainer's row sits beside the token baseline's.
    for own in sorted(data.score_sets(CONTROL_OWN), key=lambda s: (s.scorer, s.explainer)):
        if not np.isin(own.sae_id, list(sae_ids)).any():
            continue
        shuffled = data.find_scores(own.explainer, own.scorer, CONTROL_SHUFFLED)
        scorers.append(_scorer_section(group, columns, own, shuffled, config))
    agreement: list[AgreementSection] = []
    if embed is not None and config.agreement:
        agreement = explanation_agreement(
            group,
            data.explanations,
            embed,
            max_random_pairs=config.max_random_pairs,
            bootstrap=bootstrap_of(config),
        )
    return HookpointReport(
        hookpoint=group.hookpoint,
        seeds=group.seeds,
        n_latents={seed: sae.n_latents for seed, sae in group.saes.items()},
        firing_statistics=all(sae.has_statistics for sae in group.saes.values()),
        pairs=pair_counts(group),
        presence=presence_table(group),
        scorers=scorers,
        agreement=agreement,
        cross_seed=_cross_seed_sections(group, data, config),
        random_model=[]
        if control is None
        else random_model_rows(
            group,
            data,
            next((g for g in control.hookpoints if g.hookpoint == group.hookpoint), None),
            control,
            config,
        ),
    )


def _random_model_missing(data: RunData, control: RunData | None) -> list[str]:
    if not data.score_sets(CONTROL_OWN) or parse_model_spec(data.run.subject_model).is_random:
        return []
    if control is None:
        return [
            "no random-model baseline: SAEs of a model with random weights can score about as "
            "well (Heap et al.); set `random_model_seed` in the study file and rerun "
            "`autointerp run`"
        ]
    if not control.score_sets(CONTROL_OWN):
        return [
            f"the random-model control `{control.run.name}` has no scores in this campaign: "
            f"queue it in the same campaign (`autointerp queue --run {control.run.name}` with "
            "this campaign's config and LLM), then `autointerp score`"
        ]
    return []


def missing_parts(
    data: RunData, report: Report, config: ReportConfig, control: RunData | None = None
) -> list[str]:
    """What the run lacks for a full report, each with the step that adds it."""
    name = data.run.name
    missing = []
    if not data.hookpoints:
        missing.append(f"no SAEs are registered for run `{name}`: train the run first")
        return missing
    for group in report.hookpoints:
        where = f"the SAEs at `{group.hookpoint}`" if len(report.hookpoints) > 1 else "the SAEs"
        if len(group.seeds) < 2:
            missing.append(f"{where} have a single seed: train at least two seeds to compare")
        elif not group.pairs:
            missing.append(f"no matchings stored for {where}: match the seeds' SAEs")
        elif group.presence is None:
            missing.append(
                f"not every pair of seeds of {where} is matched: the multi-seed table needs all"
            )
        if not group.firing_statistics:
            missing.append(f"no firing statistics for {where}: run `autointerp cache --run {name}`")
    if data.n_examples == 0:
        missing.append(f"no example windows: run `autointerp cache --run {name}`")
    if not data.explanations:
        missing.append(
            f"no explanations: run `autointerp queue --run {name}` then `autointerp score`"
        )
    if not data.score_sets(CONTROL_OWN):
        missing.append(
            "no scores: interpretability of shared vs seed-specific latents needs scored "
            f"latents (`autointerp queue --run {name}`, then `autointerp score`)"
        )
    elif not data.score_sets(CONTROL_SHUFFLED):
        missing.append(
            "no shuffled-explanation control scores: whether each scorer discriminates at all "
            "is unknown, so its comparisons are unverified"
        )
    if data.score_sets(CONTROL_OWN) and not data.score_sets(CONTROL_CROSS_SEED):
        missing.append("no cross-seed scores (explanations scored on the partner latent)")
    if (
        config.agreement
        and data.explanations
        and not any(group.agreement for group in report.hookpoints)
    ):
        missing.append(
            "no explanation agreement: it needs explanations of matched latents in two seeds"
        )
    missing.extend(_random_model_missing(data, control))
    return missing


def build_report(
    data: RunData,
    config: ReportConfig | None = None,
    embed: Embed | None = None,
    control: RunData | None = None,
) -> Report:
    """The report on `data`; `embed` (texts -> unit rows) enables explanation agreement;
    `control`, the run's random-model control with scores of the same campaign, adds the
    random-model baseline."""
    config = config or ReportConfig()
    if embed is None:
        config = config.model_copy(update={"agreement": False})
    report = Report(
        run=data.run.name,
        subject_model=data.run.subject_model,
        dataset=data.run.dataset,
        architecture=data.run.architecture,
        k=data.run.k,
        seeds=data.run.seeds,
        n_examples=data.n_examples,
        config=config,
        hookpoints=[
            hookpoint_report(group, data, config, embed, control) for group in data.hookpoints
        ],
        missing=[],
    )
    report.missing = missing_parts(data, report, config, control)
    report.n_sharing_tests = _holm_adjust(
        test
        for group in report.hookpoints
        for section in group.scorers
        for test in (section.by_match_group, section.frequency_adjusted)
    )
    if control is not None:
        report.random_model = RandomModelBaseline(
            run=control.run.name,
            subject_model=control.run.subject_model,
            model=describe_model(control.run.subject_model),
        )
        report.random_model.n_tests = _holm_adjust(
            test
            for group in report.hookpoints
            for row in group.random_model
            for test in (row.by_match_group, row.frequency_adjusted)
        )
    return report


def _holm_adjust(tests: Iterable[SharingTest | RandomModelTest | None]) -> int:
    """Set each test's Holm-adjusted p-value over the family of those with a p-value;
    return the family's size."""
    family = [test for test in tests if test is not None and test.p_value is not None]
    adjusted = holm([test.p_value for test in family if test.p_value is not None])
    for test, p_holm in zip(family, adjusted, strict=True):
        test.p_holm = p_holm
    return len(family)
