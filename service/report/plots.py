"""The report's figures as PNG bytes (matplotlib, Agg, no pyplot state).

- decoder vs encoder matched cosine of every latent, coloured by whether the two assignments
  chose the same partner, with density contours per colour;
- matched similarity against firing count, shared and seed-specific latents coloured;
- score distributions of shared and seed-specific latents, one panel per explainer and scorer.

Figures are drawn on matplotlib's Agg canvas without pyplot. Large SAEs are drawn from a
seeded subsample of points (a scatter of half a million points shows no more than one of
twenty thousand, and costs seconds and memory to draw), and density contours are estimated
from a smaller one; a sampled figure's caption says how many points of how many it drew.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from service.report.data import HookpointData, RunData
from service.report.report import HookpointReport
from service.store.models import CONTROL_OWN

MAX_POINTS = 20_000
MAX_KDE_POINTS = 3_000
COLORS = {"agree": "#1f77b4", "disagree": "#d62728", "shared": "#2ca02c", "specific": "#ff7f0e"}


@dataclass
class Plot:
    """One figure: a title, a caption saying what it shows, and the PNG."""

    title: str
    caption: str
    png: bytes


def _png(figure: Figure) -> bytes:
    # The Agg canvas directly, not pyplot: no global figure state, safe beside other threads.
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _sampling_note(drawn: dict[str, tuple[int, int]], contours: bool = False) -> str:
    """What a figure drew of its points (`drawn`: label -> (drawn, total)) and, with
    `contours`, from how many it estimated their density; "" when it used them all."""
    notes = []
    if any(shown < total for shown, total in drawn.values()):
        parts = [f"{shown:,} of {total:,} {label}" for label, (shown, total) in drawn.items()]
        notes.append(f"points drawn: {' and '.join(parts)} (a seeded random sample)")
    if contours and any(total > MAX_KDE_POINTS for _, total in drawn.values()):
        notes.append(f"contours estimated from at most {MAX_KDE_POINTS:,} points per colour")
    return f" Sampled: {'; '.join(notes)}." if notes else ""


def _contours(axes: Axes, x: np.ndarray, y: np.ndarray, color: str) -> None:
    """Density contours of the points, when there are enough to estimate one."""
    keep = _subsample(x.size, MAX_KDE_POINTS)
    points = np.vstack([x[keep], y[keep]])
    if points.shape[1] < 5 or np.ptp(points[0]) == 0 or np.ptp(points[1]) == 0:
        return
    try:
        density = stats.gaussian_kde(points)
    except np.linalg.LinAlgError:
        return
    grid_x, grid_y = np.meshgrid(
        np.linspace(x.min(), x.max(), 60), np.linspace(y.min(), y.max(), 60)
    )
    values = density(np.vstack([grid_x.ravel(), grid_y.ravel()])).reshape(grid_x.shape)
    axes.contour(grid_x, grid_y, values, levels=5, colors=color, linewidths=1.0)


def _unordered_pairs(group: HookpointData) -> list[tuple[int, int]]:
    """Each pair of seeds once, in the direction that was stored when only one was."""
    chosen = []
    for a, b in itertools.combinations(group.seeds, 2):
        if (a, b) in group.pairs:
            chosen.append((b, a) if group.pairs[(a, b)].derived else (a, b))
    return chosen


def cosine_plot(group: HookpointData, max_points: int = MAX_POINTS) -> Plot | None:
    """Decoder vs encoder matched cosine, coloured by agreement of the two assignments; at
    most `max_points` points of each colour are drawn."""
    pairs = [group.pairs[key] for key in _unordered_pairs(group)]
    if not pairs:
        return None
    decoder = np.concatenate([pair.cos_decoder for pair in pairs])
    encoder = np.concatenate([pair.cos_encoder for pair in pairs])
    agree = np.concatenate([pair.agree for pair in pairs])
    valid = np.isfinite(decoder) & np.isfinite(encoder)
    threshold = pairs[0].threshold
    figure = Figure(figsize=(6, 5))
    axes = figure.add_subplot()
    drawn = {}
    for label, mask, color in (
        ("same partner", agree & valid, COLORS["agree"]),
        ("different partners", ~agree & valid, COLORS["disagree"]),
    ):
        x, y = decoder[mask], encoder[mask]
        shown = _subsample(x.size, max_points)
        drawn[label] = (shown.size, x.size)
        axes.scatter(x[shown], y[shown], s=4, alpha=0.35, color=color, label=label)
        _contours(axes, x, y, color)
    axes.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
    axes.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("decoder matched cosine")
    axes.set_ylabel("encoder matched cosine")
    axes.legend(loc="lower right")
    return Plot(
        title="Decoder vs encoder cosine of matched latents",
        caption="Each point is a latent matched into another seed (each pair of seeds once); "
        "colour: "
        "whether the decoder and encoder assignments chose the same partner; contours: "
        "density; dashed lines: the shared threshold." + _sampling_note(drawn, contours=True),
        png=_png(figure),
    )


def similarity_plot(group: HookpointData, max_points: int = MAX_POINTS) -> Plot | None:
    """Matched similarity against firing count; shared and seed-specific coloured; at most
    `max_points` points of each colour are drawn."""
    xs, ys, shared = [], [], []
    for seed, sae in group.saes.items():
        similarity = group.matched_similarity(seed)
        mask = group.shared_any(seed)
        if similarity is None or mask is None or not sae.has_statistics:
            continue
        xs.append(sae.firing_count)
        ys.append(similarity)
        shared.append(mask)
    if not xs:
        return None
    count, similarity, is_shared = np.concatenate(xs), np.concatenate(ys), np.concatenate(shared)
    valid = np.isfinite(count) & np.isfinite(similarity) & (count > 0)
    threshold = next(iter(group.pairs.values())).threshold
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    drawn = {}
    for label, mask, color in (
        ("shared", is_shared & valid, COLORS["shared"]),
        ("seed-specific", ~is_shared & valid, COLORS["specific"]),
    ):
        shown = np.flatnonzero(mask)[_subsample(int(mask.sum()), max_points)]
        drawn[label] = (shown.size, int(mask.sum()))
        axes.scatter(count[shown], similarity[shown], s=4, alpha=0.4, color=color, label=label)
    axes.set_xscale("log")
    axes.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("firing count (tokens the latent fired on)")
    axes.set_ylabel("matched similarity")
    axes.legend(loc="lower right")
    return Plot(
        title="Matched similarity vs firing count",
        caption="Matched similarity: the best, over other seeds, of the smaller of a latent's "
        "decoder and encoder matched cosines (shared above the dashed line). Dead latents "
        "are left out." + _sampling_note(drawn),
        png=_png(figure),
    )


def score_plot(group: HookpointData, data: RunData, report: HookpointReport) -> Plot | None:
    """Histograms of shared and seed-specific latents' scores, per explainer and scorer."""
    panels = []
    verdicts = {(s.explainer, s.scorer): s.informative for s in report.scorers}
    for own in data.score_sets(CONTROL_OWN):
        shared_values, specific_values = [], []
        for seed, sae in group.saes.items():
            mask = group.shared_any(seed)
            if mask is None:
                continue
            values = own.for_sae(sae.id).dense(sae.n_latents)
            shared_values.append(values[mask])
            specific_values.append(values[~mask])
        if not shared_values:
            continue
        shared = np.concatenate(shared_values)
        specific = np.concatenate(specific_values)
        shared, specific = shared[np.isfinite(shared)], specific[np.isfinite(specific)]
        if shared.size or specific.size:
            panels.append((own.explainer, own.scorer, own.metric, shared, specific))
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows))
    bins = np.linspace(0, 1, 21).tolist()
    for position, (explainer, scorer, metric, shared, specific) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, position)
        for label, values, color in (
            ("shared", shared, COLORS["shared"]),
            ("seed-specific", specific, COLORS["specific"]),
        ):
            if values.size:
                axes.hist(
                    values, bins=bins, density=True, histtype="step", color=color, label=label
                )
        title = f"{explainer} / {scorer}"
        if verdicts.get((explainer, scorer)) is False:
            title += " (uninformative)"
        axes.set_title(title, fontsize=10)
        axes.set_xlabel(metric.replace("_", " "))
        axes.set_ylabel("density")
        axes.legend(fontsize=8)
    figure.tight_layout()
    return Plot(
        title="Score distributions, shared vs seed-specific",
        caption="Per explainer and scorer, the distribution of own-explanation scores of "
        "shared and of seed-specific latents; a panel marked uninformative failed its "
        "shuffled-explanation control.",
        png=_png(figure),
    )


def hookpoint_plots(
    group: HookpointData, data: RunData, report: HookpointReport, max_points: int = MAX_POINTS
) -> list[Plot]:
    """Every figure that the hookpoint's data allow, scatter plots drawing at most
    `max_points` points of each colour."""
    plots = [
        cosine_plot(group, max_points),
        similarity_plot(group, max_points),
        score_plot(group, data, report),
    ]
    return [plot for plot in plots if plot is not None]
