"""The report at scale reads and draws only what it needs: on a run below the sample size the
figures are what drawing every point gives, and a sampled figure says what it drew."""

from collections.abc import Iterator

import pytest
from report_fixtures import N_LATENTS, SEEDS, populate

from service.config import ReportConfig
from service.report.data import RunData, load_run_data
from service.report.html import render_html
from service.report.plots import MAX_POINTS, hookpoint_plots
from service.report.report import Report, build_report
from service.store.engine import Store, open_store, upgrade

FAST = ReportConfig(n_resamples=300, agreement=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunData, Report]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('scale') / 'store.db'}"
    upgrade(url)
    store: Store = open_store(url)
    populate(store)
    data = load_run_data(store, "study")
    store.dispose()
    yield data, build_report(data, FAST)


def test_figures_below_the_sample_size_draw_every_point(study: tuple[RunData, Report]):
    data, report = study
    (group,) = data.hookpoints
    (section,) = report.hookpoints
    # 3 pairs x 40 latents in the cosine figure: far below the sample size.
    assert len(SEEDS) * N_LATENTS < MAX_POINTS
    default = hookpoint_plots(group, data, section)
    unsampled = hookpoint_plots(group, data, section, max_points=10**9)
    assert [plot.title for plot in default] == [plot.title for plot in unsampled]
    assert len(default) == 3
    for plot, every_point in zip(default, unsampled, strict=True):
        assert plot.caption == every_point.caption
        assert "Sampled" not in plot.caption
        assert plot.png == every_point.png
    assert render_html(report, {group.hookpoint: default}) == render_html(
        report, {group.hookpoint: unsampled}
    )


def test_a_sampled_figure_says_what_it_drew(study: tuple[RunData, Report]):
    data, report = study
    (group,) = data.hookpoints
    (section,) = report.hookpoints
    pairs = [group.pairs[(a, b)] for a, b in ((0, 1), (0, 2), (1, 2))]
    agree = sum(int(pair.agree.sum()) for pair in pairs)
    disagree = sum(int((~pair.agree).sum()) for pair in pairs)
    assert agree > 10 and disagree > 10
    shared = sum(int(group.shared_any(seed).sum()) for seed in SEEDS)  # type: ignore[union-attr]
    alive = sum(int((group.saes[seed].firing_count > 0).sum()) for seed in SEEDS)
    sampled = hookpoint_plots(group, data, section, max_points=10)
    every_point = hookpoint_plots(group, data, section, max_points=10**9)
    cosine, similarity, scores = sampled
    assert cosine.caption.endswith(
        f" Sampled: points drawn: 10 of {agree} same partner and 10 of {disagree} different "
        "partners (a seeded random sample)."
    )
    assert similarity.caption.endswith(
        f" Sampled: points drawn: 10 of {shared} shared and 10 of {alive - shared} "
        "seed-specific (a seeded random sample)."
    )
    assert cosine.png != every_point[0].png
    # Histograms are not sampled: every score is counted.
    assert scores == every_point[2]
    # The same sample every time.
    assert hookpoint_plots(group, data, section, max_points=10)[0].png == cosine.png
    page = render_html(report, {group.hookpoint: sampled})
    assert f"10 of {agree} same partner" in page
