"""The report's headline as rich tables for the terminal: pairs of seeds, the multi-seed
presence table, each scorer's control verdict with shared vs seed-specific interpretability
and the latents that score well yet are seed-specific, the tests of the difference (match
groups as the unit, plain and frequency-adjusted, p-values raw and Holm-adjusted),
explanation agreement, cross-seed scoring (shared vs seed-specific), the scores beside the
random-model control's, and what the run is missing."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from sae.model_spec import describe_model
from service.report.compare import CampaignComparison
from service.report.random_model import BETTER, NO_BETTER, RandomModelBaseline, verdict
from service.report.report import HookpointReport, Report, ScorerSection
from service.report.statistics import Summary

DASH = "-"


def _number(value: float | None, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _with_ci(summary: Summary) -> str:
    if summary.mean is None:
        return DASH
    if summary.ci_low is None or summary.ci_high is None:
        return f"{summary.mean:.3f} (n={summary.n})"
    return f"{summary.mean:.3f} [{summary.ci_low:.3f}, {summary.ci_high:.3f}] (n={summary.n})"


def _verdict(section: ScorerSection) -> Text:
    if section.control is None:
        return Text("unverified (no control)", style="yellow")
    if section.informative is None:
        return Text("too few latents", style="yellow")
    gap = section.control.gap
    detail = f" (gap {_number(gap.mean)} [{_number(gap.ci_low)}, {_number(gap.ci_high)}])"
    if section.informative:
        return Text("informative" + detail, style="green")
    return Text("UNINFORMATIVE" + detail, style="bold red")


def _pairs(group: HookpointReport) -> Table:
    table = Table(
        "seeds",
        "shared",
        "seed-specific",
        "shared %",
        "decoder-only %",
        "same partner %",
        title=f"{group.hookpoint}: shared and seed-specific latents",
    )
    for pair in group.pairs:
        n = max(pair.n_latents, 1)
        table.add_row(
            f"{pair.seed_a} -> {pair.seed_b}",
            f"{pair.shared:,}",
            f"{pair.seed_specific:,}",
            f"{100 * pair.shared_fraction:.1f}",
            f"{100 * pair.shared_decoder_only / n:.1f}",
            f"{100 * pair.encoder_decoder_agreement:.1f}",
        )
    return table


def _scorers(group: HookpointReport, threshold: float) -> Table:
    table = Table(
        "explainer / scorer",
        "control",
        "shared: mean [95% CI]",
        "seed-specific: mean [95% CI]",
        f"scoring > {threshold:g}: seed-specific",
        title=f"{group.hookpoint}: interpretability, shared vs seed-specific",
    )
    for section in group.scorers:
        label = f"{section.explainer} / {section.scorer} ({section.metric})"
        comparison = section.shared_vs_specific
        if section.informative is False:
            table.add_row(label, _verdict(section), "not shown: scorer failed its control", "", "")
        elif comparison is None:
            table.add_row(label, _verdict(section), "no matchings", "", "")
        else:
            good = section.good_but_specific
            table.add_row(
                label,
                _verdict(section),
                _with_ci(comparison.shared),
                _with_ci(comparison.seed_specific),
                DASH
                if good is None or good.fraction_of_good is None
                else f"{good.n_good_seed_specific} of {good.n_good} "
                f"({100 * good.fraction_of_good:.1f}%)",
            )
    return table


def _p(value: float | None) -> str:
    return DASH if value is None else f"{value:.3g}"


def _tests(group: HookpointReport, n_tests: int) -> Table:
    table = Table(
        "explainer / scorer",
        "test",
        "groups compared: shared / seed-specific",
        "shared - seed-specific [95% CI]",
        "p",
        f"p, Holm ({n_tests} tests)",
        title=f"{group.hookpoint}: shared vs seed-specific, match groups as the unit",
    )
    for section in group.scorers:
        label = f"{section.explainer} / {section.scorer}"
        if section.informative is False:
            table.add_row(label, "not shown: scorer failed its control", "", "", "", "")
            continue
        for name, test in (
            ("match groups", section.by_match_group),
            ("frequency-adjusted", section.frequency_adjusted),
        ):
            if test is None:
                continue
            if test.difference is None:
                detail = "no frequency bin holds both" if test.n_units else "no scored groups"
                table.add_row(label, name, f"{test.n_shared} / {test.n_seed_specific}", detail)
                continue
            plural = "" if test.n_strata == 1 else "s"
            strata = f", {test.n_strata} bin{plural}" if test is section.frequency_adjusted else ""
            table.add_row(
                label,
                name + strata,
                f"{test.n_shared} / {test.n_seed_specific}",
                f"{test.difference:.3f} [{_number(test.ci_low)}, {_number(test.ci_high)}]",
                _p(test.p_value),
                _p(test.p_holm),
            )
    return table


def _test_legend(group: HookpointReport) -> list[Text]:
    """What each test of the tests table is, in words."""
    section = next((s for s in group.scorers if s.by_match_group is not None), None)
    if section is None or section.by_match_group is None:
        return []
    lines = [f"match groups: {section.by_match_group.test}"]
    if section.frequency_adjusted is not None:
        lines.append(f"frequency-adjusted: {section.frequency_adjusted.test}")
    lines.append(
        f"permutations and bootstrap resamples: {section.by_match_group.n_permutations}; "
        "Holm adjusts over every shared vs seed-specific test of this report"
    )
    return [Text(line, style="dim") for line in lines]


def _presence(group: HookpointReport) -> Table:
    table = Table(
        "present in",
        "mean latents",
        "fraction",
        "only in base among as many SAEs",
        title=f"{group.hookpoint}: latents present in exactly m of {len(group.seeds)} SAEs",
    )
    for row in group.presence or []:
        table.add_row(
            f"{row.m} SAE" + ("" if row.m == 1 else "s"),
            f"{row.mean_latents:,.1f}",
            f"{100 * row.fraction:.1f}%",
            f"{100 * row.only_in_base_fraction:.1f}%",
        )
    return table


def _agreement(group: HookpointReport) -> Table:
    table = Table(
        "explainer, seeds",
        "matched pairs: mean cosine [95% CI]",
        "random pairs: mean",
        "p (Mann-Whitney)",
        title=f"{group.hookpoint}: explanation agreement across seeds",
    )
    for section in group.agreement:
        table.add_row(
            f"{section.explainer}, {section.seed_a} & {section.seed_b}",
            _with_ci(section.matched),
            _number(section.random.mean),
            DASH if section.p_value is None else f"{section.p_value:.3g}",
        )
    return table


def _cross_seed(group: HookpointReport) -> Table:
    table = Table(
        "explainer / scorer",
        "cross-seed: mean [95% CI]",
        "own - cross-seed: mean [95% CI]",
        "own - cross-seed, shared",
        "own - cross-seed, seed-specific",
        "p (Mann-Whitney)",
        title=f"{group.hookpoint}: the partner's explanation (other seed) scored on the latent",
    )
    failed = {(s.explainer, s.scorer) for s in group.scorers if s.informative is False}
    for section in group.cross_seed:
        label = f"{section.explainer} / {section.scorer}"
        if (section.explainer, section.scorer) in failed:
            table.add_row(label, "not shown: scorer failed its control", "", "", "", "")
            continue
        by_sharing = section.gap_shared_vs_specific
        table.add_row(
            label,
            _with_ci(section.cross_seed),
            _with_ci(section.gap),
            DASH if by_sharing is None else _with_ci(by_sharing.shared),
            DASH if by_sharing is None else _with_ci(by_sharing.seed_specific),
            DASH
            if by_sharing is None or by_sharing.p_value is None
            else f"{by_sharing.p_value:.3g}",
        )
    return table


def _random_verdict(text: str | None) -> Text:
    if text is None:
        return Text(DASH)
    style = {BETTER: "green", NO_BETTER: "bold red"}.get(text, "yellow")
    return Text(text, style=style)


def _random_model(group: HookpointReport, baseline: RandomModelBaseline) -> list[RenderableType]:
    table = Table(
        "explainer / scorer",
        "test",
        "trained: mean [95% CI]",
        "random model: mean [95% CI]",
        "trained - random [95% CI]",
        "p",
        f"p, Holm ({baseline.n_tests} tests)",
        "verdict",
        title=f"{group.hookpoint}: trained model vs random-model baseline "
        f"(run {baseline.run}: {baseline.model})",
    )
    notes: list[RenderableType] = []
    failed = {(s.explainer, s.scorer) for s in group.scorers if s.informative is False}
    for row in group.random_model:
        label = f"{row.explainer} / {row.scorer} ({row.metric})"
        if (row.explainer, row.scorer) in failed:
            table.add_row(label, "not shown: scorer failed its control", "", "", "", "", "", "")
            continue
        if row.by_match_group is None:
            table.add_row(
                label, "", _with_ci(row.trained), "random model not scored with this pair"
            )
            continue
        for name, test in (
            ("match groups", row.by_match_group),
            ("frequency-adjusted", row.frequency_adjusted),
        ):
            if test is None:
                continue
            plain = test is row.by_match_group
            if test.difference is None:
                detail = "no frequency bin holds both" if test.n_units else "no scored groups"
                table.add_row(label, name, "", "", detail)
                continue
            plural = "" if test.n_strata == 1 else "s"
            table.add_row(
                label,
                name if plain else f"{name}, {test.n_strata} bin{plural}",
                _with_ci(row.trained) if plain else "",
                _with_ci(row.random) if plain else "",
                f"{test.difference:.3f} [{_number(test.ci_low)}, {_number(test.ci_high)}] "
                f"({test.n_trained} / {test.n_random} groups)",
                _p(test.p_value),
                _p(test.p_holm),
                _random_verdict(verdict(test)),
            )
        if row.random_undefined:
            notes.append(
                Text(
                    f"{row.explainer} / {row.scorer} on the random model: {row.metric} undefined "
                    f"(NULL, left out) for {row.undefined_text()}",
                    style="yellow",
                )
            )
        if row.random_control is not None and row.random_control.informative is False:
            notes.append(
                Text(
                    f"{row.explainer} / {row.scorer} on the random model: own explanations do "
                    "not beat shuffled ones",
                    style="dim",
                )
            )
    section = next((r.by_match_group for r in group.random_model if r.by_match_group), None)
    if section is not None:
        notes.append(Text(f"match groups: {section.test}", style="dim"))
    return [table, *notes]


def _comparison(comparison: CampaignComparison) -> Table:
    table = Table(
        "explainer / scorer",
        "latents",
        "n",
        "first",
        "second",
        "second - first [95% CI]",
        "p (Wilcoxon)",
        title=f"first: {comparison.first}\nsecond: {comparison.second}\n({comparison.test})",
    )
    for row in comparison.rows:
        table.add_row(
            f"{row.explainer} / {row.scorer} ({row.metric})",
            row.group,
            str(row.n),
            _number(row.mean_first),
            _number(row.mean_second),
            _with_ci(row.difference),
            DASH if row.wilcoxon_p is None else f"{row.wilcoxon_p:.3g}",
        )
    return table


def headline(report: Report) -> list[RenderableType]:
    """What `autointerp report` prints."""
    parts: list[RenderableType] = [
        Text(f"report on run {report.run} ({describe_model(report.subject_model)})", style="bold")
    ]
    if report.campaign is not None:
        parts.append(Text(f"scores of {report.campaign}"))
    if report.random_model is not None:
        parts.append(
            Text(
                f"random-model baseline: run {report.random_model.run} "
                f"({report.random_model.model}), same campaign"
            )
        )
    for group in report.hookpoints:
        if group.pairs:
            parts.append(_pairs(group))
        if group.presence:
            parts.append(_presence(group))
        if group.scorers:
            parts.append(_scorers(group, report.config.good_threshold))
            parts.extend(
                Text(
                    f"{section.explainer} / {section.scorer}: {section.metric} undefined "
                    f"(NULL, left out) for {section.undefined_text()}",
                    style="yellow",
                )
                for section in group.scorers
                if section.undefined
            )
        if any(section.by_match_group for section in group.scorers):
            parts.append(_tests(group, report.n_sharing_tests))
            parts.extend(_test_legend(group))
        if group.agreement:
            parts.append(_agreement(group))
        if group.cross_seed:
            parts.append(_cross_seed(group))
        if report.random_model is not None and group.random_model:
            parts.extend(_random_model(group, report.random_model))
    if report.comparison is not None:
        parts.append(_comparison(report.comparison))
    for line in report.missing:
        parts.append(Text(f"missing: {line}", style="yellow"))
    return parts
