"""`autointerp report`: shared vs seed-specific interpretability of a run, from the store.

`data` loads the run into arrays, `statistics` holds the tests, `report` computes the
report's models, `agreement` compares explanations across seeds, `plots` draws the figures,
`html` writes the page and `terminal` prints the headline. `make_report` ties them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae.errors import UserError
from service.config import ReportConfig
from service.report.compare import compare_campaigns
from service.report.data import RunData, load_random_control, load_run_data
from service.report.html import render_html
from service.report.plots import hookpoint_plots
from service.report.report import Report, bootstrap_of, build_report
from service.store.engine import Store


@dataclass
class ReportResult:
    report: Report
    data: RunData


def make_report(
    store: Store,
    run_name: str,
    config: ReportConfig | None = None,
    campaign: int | None = None,
    compare: int | None = None,
) -> ReportResult:
    """Load the run and compute its report on the scores of campaign `campaign` (None: the
    newest with scores for the run), beside campaign `compare`'s when given, and beside its
    random-model control's scores of the same campaign when the run has a control; the
    embedding model loads only when explanation agreement has matched explanations to
    compare."""
    config = config or ReportConfig()
    data = load_run_data(store, run_name, campaign)
    control = load_random_control(store, data)

    def embed(texts: Sequence[str]) -> np.ndarray:
        from service.scorers.embedder import load_embedder

        return load_embedder(config.embedding_model).embed(texts)

    report = build_report(data, config, embed if config.agreement else None, control)
    report.campaign = data.campaign
    if compare is not None:
        other = load_run_data(store, run_name, compare)
        if data.campaign is None:
            raise UserError(f"run {run_name!r} has no scores to compare with campaign {compare}")
        report.comparison = compare_campaigns(data, other, bootstrap_of(config))
    return ReportResult(report, data)


def check_html_path(path: Path) -> None:
    """Fail before any work when the HTML report could not be written to `path`."""
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name ending in .html")


def write_html(result: ReportResult, path: Path) -> None:
    """Draw the figures and write the self-contained HTML page to `path`."""
    check_html_path(path)
    groups = {group.hookpoint: group for group in result.data.hookpoints}
    plots = {
        section.hookpoint: hookpoint_plots(groups[section.hookpoint], result.data, section)
        for section in result.report.hookpoints
    }
    path.write_text(render_html(result.report, plots), encoding="utf-8")


__all__ = [
    "Report",
    "ReportResult",
    "build_report",
    "check_html_path",
    "make_report",
    "write_html",
]
