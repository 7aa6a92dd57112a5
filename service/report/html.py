"""The report as one self-contained HTML page: tables and PNG figures embedded as base64.

Every number sits in a table cell whose column has a header and whose row starts with a
header cell, so each number is labelled by what it is and what it is of; prose carries no
numbers (identifiers such as run names and commands are set in <code>). A scorer that failed
its specificity control gets a plain statement instead of numbers in every table built on it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from sae.model_spec import describe_model
from service.report.plots import Plot
from service.report.random_model import RandomModelTest, verdict
from service.report.report import HookpointReport, Report, ScorerSection, SharingTest
from service.report.statistics import Summary

DASH = "\u2013"
UNINFORMATIVE = "uninformative: the scorer did not beat its shuffled-explanation control"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.4em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
thead th { background: #f3f3f3; }
tbody th { text-align: left; font-weight: normal; background: #fafafa; }
td { text-align: right; font-variant-numeric: tabular-nums; }
td.note { text-align: left; color: #a33; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; }
li code, p code, h1 code, h2 code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _number(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _p_value(value: float | None) -> str:
    return DASH if value is None else f"{value:.3g}"


def _inline(text: str) -> str:
    """Escaped prose with `backticked` spans set as code."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(
        f"<code>{html.escape(part)}</code>" if index % 2 else html.escape(part)
        for index, part in enumerate(parts)
    )


Row = tuple[str, Sequence[str]]


def _table(caption: str, columns: Sequence[str], rows: Sequence[Row], note: str = "") -> str:
    """A table whose first column labels the rows; a row whose cells are one string starting
    with `note:` spans the row with that text."""
    head = "".join(f'<th scope="col">{html.escape(column)}</th>' for column in columns)
    body = []
    for label, cells in rows:
        row_head = f'<th scope="row">{html.escape(label)}</th>'
        if len(cells) == 1 and cells[0].startswith("note:"):
            text = html.escape(cells[0].removeprefix("note:"))
            body.append(
                f'<tr>{row_head}<td class="note" colspan="{len(columns) - 1}">{text}</td></tr>'
            )
            continue
        data = "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        body.append(f"<tr>{row_head}{data}</tr>")
    after = f"<p>{_inline(note)}</p>" if note else ""
    return (
        f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>{after}"
    )


def _label(section: ScorerSection) -> str:
    return f"{section.explainer} / {section.scorer}"


def _verdict(section: ScorerSection) -> str:
    if section.control is None:
        return "no control yet (unverified)"
    if section.informative is None:
        return "too few latents for a verdict"
    return "informative" if section.informative else "uninformative"


def _summary_cells(summary: Summary) -> list[str]:
    return [
        _number(summary.n),
        _number(summary.mean),
        _number(summary.median),
        _number(summary.ci_low),
        _number(summary.ci_high),
    ]


def _pairs_table(group: HookpointReport) -> str:
    rows: list[Row] = [
        (
            f"seed {pair.seed_a} into seed {pair.seed_b}",
            [
                _number(pair.n_latents),
                _number(pair.threshold, 2),
                _number(pair.shared),
                _number(pair.seed_specific),
                _percent(pair.shared_fraction),
                _number(pair.shared_decoder_only),
                _percent(pair.encoder_decoder_agreement),
                _number(pair.mean_cos_decoder),
                _number(pair.mean_cos_encoder),
                "inverted" if pair.derived else "stored",
            ],
        )
        for pair in group.pairs
    ]
    return _table(
        "Shared and seed-specific latents per pair of seeds",
        [
            "pair",
            "latents",
            "threshold",
            "shared (decoder and encoder)",
            "seed-specific",
            "shared fraction",
            "shared, decoder only",
            "same partner under both",
            "mean decoder cosine",
            "mean encoder cosine",
            "matching",
        ],
        rows,
    )


def _presence_table(group: HookpointReport) -> str:
    if group.presence is None:
        return ""
    rows: list[Row] = [
        (
            f"present in exactly {row.m} of the SAEs",
            [
                _number(row.mean_latents, 1),
                _percent(row.fraction),
                _percent(row.only_in_base_fraction),
            ],
        )
        for row in group.presence
    ]
    return _table(
        "Multi-seed presence (mean over base SAEs)",
        [
            "latents present in",
            "mean latents",
            "fraction of latents",
            "only in the base SAE when compared with as many SAEs",
        ],
        rows,
    )


def _scored_table(group: HookpointReport) -> str:
    rows: list[Row] = [
        (
            _label(section),
            [
                section.metric.replace("_", " "),
                _number(section.scored.n + sum(section.undefined.values())),
                _number(section.scored.n),
                _number(sum(section.undefined.values())),
                section.undefined_text() or DASH,
                _percent(section.failed_answer_rate),
            ],
        )
        for section in group.scorers
    ]
    return _table(
        "Latents scored with their own explanation",
        [
            "explainer / scorer",
            "metric",
            "latents scored",
            "metric defined",
            "metric undefined (NULL, left out of every statistic)",
            "undefined, by reason",
            "unparsed answers",
        ],
        rows,
    )


def _control_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    for section in group.scorers:
        control = section.control
        if control is None:
            rows.append((_label(section), [f"note:{_verdict(section)}"]))
            continue
        rows.append(
            (
                _label(section),
                [
                    _number(control.n),
                    _number(control.own.mean),
                    _number(control.shuffled.mean),
                    _number(control.gap.mean),
                    _number(control.gap.ci_low),
                    _number(control.gap.ci_high),
                    _verdict(section),
                ],
            )
        )
    return _table(
        "Specificity control: own explanation vs another latent's (shuffled)",
        [
            "explainer / scorer",
            "latents scored both ways",
            "own mean",
            "shuffled mean",
            "gap mean",
            "gap CI low",
            "gap CI high",
            "verdict",
        ],
        rows,
    )


def _interpretability_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    for section in group.scorers:
        comparison = section.shared_vs_specific
        if section.informative is False:
            rows.append((_label(section), [f"note:{UNINFORMATIVE}"]))
        elif comparison is None:
            rows.append((_label(section), ["note:no matchings: shared status unknown"]))
        else:
            rows.append(
                (
                    _label(section),
                    [
                        section.metric.replace("_", " "),
                        *_summary_cells(comparison.shared),
                        *_summary_cells(comparison.seed_specific),
                        _number(comparison.difference),
                        _verdict(section),
                    ],
                )
            )
    columns = ["explainer / scorer", "metric"]
    for group_name in ("shared", "seed-specific"):
        columns += [
            f"{group_name} latents",
            f"{group_name} mean",
            f"{group_name} median",
            f"{group_name} mean CI low",
            f"{group_name} mean CI high",
        ]
    columns += ["difference of means", "control"]
    return _table(
        "Interpretability of shared vs seed-specific latents (latents of every seed; the tests "
        "follow)",
        columns,
        rows,
    )


def _difference_cells(test: SharingTest | RandomModelTest) -> list[str]:
    """A stratified difference test's cells after its two group counts: strata, the
    difference with its CI, permutations, p and Holm-adjusted p."""
    return [
        _number(test.n_strata),
        _number(test.difference),
        _number(test.ci_low),
        _number(test.ci_high),
        _number(test.n_permutations),
        _p_value(test.p_value),
        _p_value(test.p_holm),
    ]


def _tests_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    tests: dict[str, str] = {}
    for section in group.scorers:
        for name, test in (
            ("match groups", section.by_match_group),
            ("frequency-adjusted", section.frequency_adjusted),
        ):
            if test is None:
                continue
            label = f"{_label(section)}, {name}"
            tests[name] = test.test
            if section.informative is False:
                rows.append((label, [f"note:{UNINFORMATIVE}"]))
                continue
            if test.difference is None:
                rows.append((label, ["note:no frequency bin holds both kinds of latent"]))
                continue
            rows.append(
                (
                    label,
                    [
                        _number(test.n_shared),
                        _number(test.n_seed_specific),
                        *_difference_cells(test),
                    ],
                )
            )
    if not rows:
        return ""
    legend = " ".join(f"{name.capitalize()}: {text}." for name, text in tests.items())
    return _table(
        "Shared vs seed-specific interpretability tested with match groups as the unit",
        [
            "explainer / scorer, test",
            "shared groups (in strata with both)",
            "seed-specific groups (in strata with both)",
            "frequency bins with both (strata)",
            "shared minus seed-specific",
            "CI low",
            "CI high",
            "permutations",
            "p-value",
            "p-value, Holm-adjusted over the report's shared vs seed-specific tests",
        ],
        rows,
        note=f"{legend} Holm's family is every shared vs seed-specific test of this report "
        "(its size is in the run settings).",
    )


def _per_seed_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    for section in group.scorers:
        if section.informative is False:
            continue
        for entry in section.per_seed:
            comparison = entry.comparison
            rows.append(
                (
                    f"{_label(section)}, seed {entry.seed}",
                    [
                        _number(comparison.shared.n),
                        _number(comparison.shared.mean),
                        _number(comparison.seed_specific.n),
                        _number(comparison.seed_specific.mean),
                        _number(comparison.difference),
                        _p_value(comparison.p_value),
                    ],
                )
            )
    if not rows:
        return ""
    return _table(
        "Shared vs seed-specific within each base seed (latents of one SAE; not adjusted)",
        [
            "explainer / scorer, base seed",
            "shared latents",
            "shared mean",
            "seed-specific latents",
            "seed-specific mean",
            "difference of means",
            "p-value (Mann-Whitney U)",
        ],
        rows,
    )


def _correlation_table(group: HookpointReport, good_threshold: float) -> str:
    rows: list[Row] = []
    for section in group.scorers:
        if section.informative is False:
            rows.append((_label(section), [f"note:{UNINFORMATIVE}"]))
            continue
        frequency, similarity = section.vs_firing_frequency, section.vs_matched_similarity
        good = section.good_but_specific
        rows.append(
            (
                _label(section),
                [
                    _number(frequency.rho),
                    _p_value(frequency.p_value),
                    _number(frequency.n),
                    _number(similarity.rho if similarity else None),
                    _p_value(similarity.p_value if similarity else None),
                    _number(similarity.n if similarity else None),
                    _number(good.n_good if good else None),
                    _number(good.n_good_seed_specific if good else None),
                    _percent(good.fraction_of_good if good else None),
                    _percent(good.fraction_of_seed_specific if good else None),
                ],
            )
        )
    return _table(
        "Score vs firing frequency and matched similarity; latents scoring well yet seed-specific",
        [
            "explainer / scorer",
            "Spearman rho vs firing frequency",
            "p-value (frequency)",
            "latents (frequency)",
            "Spearman rho vs matched similarity",
            "p-value (similarity)",
            "latents (similarity)",
            f"latents scoring above {good_threshold:g}",
            "of which seed-specific",
            "seed-specific share of those scoring well",
            "share of seed-specific latents scoring well",
        ],
        rows,
    )


def _by_presence_table(group: HookpointReport) -> str:
    sections = [s for s in group.scorers if s.by_presence]
    if not sections:
        return ""
    count = len(group.seeds)
    rows: list[Row] = []
    for section in sections:
        if section.informative is False:
            rows.append((_label(section), [f"note:{UNINFORMATIVE}"]))
            continue
        assert section.by_presence is not None
        cells = []
        for summary in section.by_presence:
            cells += [_number(summary.n), _number(summary.mean)]
        rows.append((_label(section), cells))
    columns = ["explainer / scorer"]
    for m in range(1, count + 1):
        where = "only its own SAE" if m == 1 else f"exactly {m} SAEs"
        columns += [f"latents present in {where}", f"mean score, present in {where}"]
    return _table("Score by the number of SAEs a latent is present in", columns, rows)


def _agreement_table(group: HookpointReport) -> str:
    if not group.agreement:
        return ""
    rows: list[Row] = [
        (
            f"{section.explainer}, seed {section.seed_a} with seed {section.seed_b}",
            [
                _number(section.matched.n),
                _number(section.matched.mean),
                _number(section.matched.ci_low),
                _number(section.matched.ci_high),
                _number(section.matched_shared.mean),
                _number(section.matched_seed_specific.mean),
                _number(section.random.n),
                _number(section.random.mean),
                _number(section.difference),
                _p_value(section.p_value),
            ],
        )
        for section in group.agreement
    ]
    return _table(
        "Explanation agreement across seeds (embedding cosine of the two explanations)",
        [
            "explainer, seeds",
            "matched pairs",
            "matched mean",
            "matched CI low",
            "matched CI high",
            "matched, shared latents: mean",
            "matched, seed-specific latents: mean",
            "random pairs",
            "random mean",
            "matched minus random",
            "p-value (Mann-Whitney U)",
        ],
        rows,
    )


def _failed_control(group: HookpointReport, explainer: str, scorer: str) -> bool:
    return any(
        section.informative is False
        for section in group.scorers
        if (section.explainer, section.scorer) == (explainer, scorer)
    )


def _cross_seed_table(group: HookpointReport) -> str:
    if not group.cross_seed:
        return ""
    rows: list[Row] = []
    for section in group.cross_seed:
        label = f"{section.explainer} / {section.scorer}"
        if _failed_control(group, section.explainer, section.scorer):
            rows.append((label, [f"note:{UNINFORMATIVE}"]))
            continue
        rows.append(
            (
                label,
                [
                    _number(section.cross_seed.n),
                    _number(section.cross_seed.mean),
                    _number(section.own.n),
                    _number(section.own.mean),
                    _number(section.gap.mean),
                    _number(section.gap.ci_low),
                    _number(section.gap.ci_high),
                ],
            )
        )
    return _table(
        "Cross-seed scoring: the partner's explanation scored on the latent",
        [
            "explainer / scorer",
            "latents scored cross-seed",
            "cross-seed mean",
            "latents with both",
            "own mean (same latents)",
            "own minus cross-seed: mean",
            "gap CI low",
            "gap CI high",
        ],
        rows,
    )


def _cross_seed_sharing_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    for section in group.cross_seed:
        label = f"{section.explainer} / {section.scorer}"
        cross, gap = section.cross_seed_shared_vs_specific, section.gap_shared_vs_specific
        if _failed_control(group, section.explainer, section.scorer):
            rows.append((label, [f"note:{UNINFORMATIVE}"]))
        elif cross is None or gap is None:
            rows.append((label, ["note:no matchings: shared status unknown"]))
        else:
            rows.append(
                (
                    label,
                    [
                        _number(cross.shared.n),
                        _number(cross.shared.mean),
                        _number(cross.seed_specific.n),
                        _number(cross.seed_specific.mean),
                        _number(cross.difference),
                        _p_value(cross.p_value),
                        _number(gap.shared.mean),
                        _number(gap.seed_specific.mean),
                        _p_value(gap.p_value),
                    ],
                )
            )
    if not rows:
        return ""
    return _table(
        "Cross-seed scoring of shared vs seed-specific latents "
        "(shared with the seed the explanation came from)",
        [
            "explainer / scorer",
            "shared latents scored cross-seed",
            "cross-seed mean, shared",
            "seed-specific latents scored cross-seed",
            "cross-seed mean, seed-specific",
            "cross-seed: shared minus seed-specific",
            "cross-seed p-value (Mann-Whitney U)",
            "own minus cross-seed, shared: mean",
            "own minus cross-seed, seed-specific: mean",
            "own minus cross-seed p-value (Mann-Whitney U)",
        ],
        rows,
    )


def _random_control_verdict(informative: bool | None) -> str:
    if informative is None:
        return "too few latents for a verdict"
    return "informative" if informative else "uninformative"


def _random_model_scores_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    for row in group.random_model:
        label = f"{row.explainer} / {row.scorer}"
        if _failed_control(group, row.explainer, row.scorer):
            rows.append((label, [f"note:{UNINFORMATIVE}"]))
            continue
        if row.by_match_group is None:
            rows.append((label, ["note:the random model is not scored with this pair"]))
            continue
        control = row.random_control
        rows.append(
            (
                label,
                [
                    row.metric.replace("_", " "),
                    *_summary_cells(row.trained),
                    *_summary_cells(row.random),
                    _number(sum(row.random_undefined.values())),
                    "no control yet" if control is None else _number(control.gap.mean),
                    DASH if control is None else _random_control_verdict(control.informative),
                ],
            )
        )
    columns = ["explainer / scorer", "metric"]
    for side in ("trained model", "random model"):
        columns += [
            f"{side} latents",
            f"{side} mean",
            f"{side} median",
            f"{side} mean CI low",
            f"{side} mean CI high",
        ]
    columns += [
        "random model: metric undefined (NULL, left out)",
        "random model: own minus shuffled explanation",
        "random model: control",
    ]
    return _table(
        "Scores of the trained model beside the random-model baseline: the same study on the "
        "subject model with re-initialised weights, scored in the same campaign (its run is "
        "named in the run settings)",
        columns,
        rows,
    )


def _random_model_tests_table(group: HookpointReport) -> str:
    rows: list[Row] = []
    tests: dict[str, str] = {}
    for row in group.random_model:
        for name, test in (
            ("match groups", row.by_match_group),
            ("frequency-adjusted", row.frequency_adjusted),
        ):
            if test is None:
                continue
            label = f"{row.explainer} / {row.scorer}, {name}"
            tests[name] = test.test
            if _failed_control(group, row.explainer, row.scorer):
                rows.append((label, [f"note:{UNINFORMATIVE}"]))
                continue
            if test.difference is None:
                rows.append((label, ["note:no frequency bin holds groups of both models"]))
                continue
            rows.append(
                (
                    label,
                    [
                        _number(test.n_trained),
                        _number(test.n_random),
                        *_difference_cells(test),
                        verdict(test) or DASH,
                    ],
                )
            )
    if not rows:
        return ""
    legend = " ".join(f"{name.capitalize()}: {text}." for name, text in tests.items())
    return _table(
        "Trained vs random model tested with match groups as the unit",
        [
            "explainer / scorer, test",
            "trained-model groups (in strata with both)",
            "random-model groups (in strata with both)",
            "frequency bins with both (strata)",
            "trained minus random",
            "CI low",
            "CI high",
            "permutations",
            "p-value",
            "p-value, Holm-adjusted over the report's trained vs random tests",
            "verdict",
        ],
        rows,
        note=f"{legend} The verdict reads the interval: above zero, better than a random "
        "model; holding zero, no better than a random model; below zero, worse.",
    )


def _figure(plot: Plot) -> str:
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption><strong>{html.escape(plot.title)}.</strong> "
        f"{_inline(plot.caption)}</figcaption></figure>"
    )


def _run_table(report: Report) -> str:
    config = report.config
    rows: list[Row] = [
        ("subject model", [describe_model(report.subject_model)]),
        ("dataset", [report.dataset]),
        ("architecture", [report.architecture]),
        ("k (active latents per token)", [_number(report.k)]),
        ("seeds", [", ".join(str(seed) for seed in report.seeds)]),
        ("example windows stored", [_number(report.n_examples)]),
        ("score threshold for scoring well", [_number(config.good_threshold, 2)]),
        ("confidence level of intervals", [_number(config.confidence, 2)]),
        ("bootstrap resamples", [_number(config.n_resamples)]),
        ("random seed of bootstrap and pairs", [_number(config.seed)]),
        ("latents the control needs for a verdict", [_number(config.min_control_latents)]),
        ("firing-frequency bins (frequency-adjusted test)", [_number(config.frequency_bins)]),
        ("shared vs seed-specific tests (Holm's family)", [_number(report.n_sharing_tests)]),
        ("embedding model (agreement)", [config.embedding_model]),
    ]
    baseline = report.random_model
    if baseline is not None:
        rows += [
            ("random-model baseline", [f"{baseline.run}: {baseline.model}"]),
            ("trained vs random tests (Holm's family)", [_number(baseline.n_tests)]),
        ]
    return _table("Run and report settings", ["what", "value"], rows)


def _hookpoint_section(group: HookpointReport, plots: Sequence[Plot], report: Report) -> str:
    parts = [f"<h2>Hookpoint <code>{html.escape(group.hookpoint)}</code></h2>"]
    if group.pairs:
        parts.append(_pairs_table(group))
    parts.append(_presence_table(group))
    if group.scorers:
        parts.append(_scored_table(group))
        parts.append(_control_table(group))
        parts.append(_interpretability_table(group))
        parts.append(_tests_table(group))
        parts.append(_per_seed_table(group))
        parts.append(_correlation_table(group, report.config.good_threshold))
        parts.append(_by_presence_table(group))
    parts.append(_agreement_table(group))
    parts.append(_cross_seed_table(group))
    parts.append(_cross_seed_sharing_table(group))
    if report.random_model is not None and group.random_model:
        parts.append(_random_model_scores_table(group))
        parts.append(_random_model_tests_table(group))
    parts.extend(_figure(plot) for plot in plots)
    return "\n".join(part for part in parts if part)


def render_html(report: Report, plots: dict[str, list[Plot]]) -> str:
    """The whole page; `plots` maps a hookpoint to its figures."""
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    missing = ""
    if report.missing:
        items = "".join(f"<li>{_inline(line)}</li>" for line in report.missing)
        missing = f"<h2>What is missing</h2><ul>{items}</ul>"
    sections = "\n".join(
        _hookpoint_section(group, plots.get(group.hookpoint, []), report)
        for group in report.hookpoints
    )
    title = f"autointerp report: {report.run}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
        f"<h1>autointerp report: <code>{html.escape(report.run)}</code></h1>"
        f"<p>Generated <code>{created}</code>. Shared latents pass both the decoder and the "
        "encoder matching threshold with at least one other seed; seed-specific latents "
        "pass it with none.</p>"
        f"{_run_table(report)}{missing}{sections}</body></html>\n"
    )
