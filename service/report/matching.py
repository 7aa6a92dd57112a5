"""How `autointerp match` shows its results: rich tables and a progress bar over blocks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import ProgressColumn, Task, TaskID
from rich.table import Table
from rich.text import Text

from sae.matching import MatchSummary
from sae.matching.multiseed import MultiSeedResult
from sae.matching.solvers import PROVEN_GAP
from sae.matching.solvers import Progress as ProgressCallback
from service.progress import count_progress


class RowRateColumn(ProgressColumn):
    """Rows of the cosine matrix per second."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text("" if speed is None else f"{speed:,.0f} rows/s")


@contextmanager
def block_progress(console: Console) -> Iterator[ProgressCallback]:
    """A progress callback drawing one bar per stage (rows of the cosine matrix done)."""
    bar = count_progress("{task.description}", RowRateColumn(), console=console, transient=True)
    with bar:
        tasks: dict[str, tuple[TaskID, int]] = {}

        def report(stage: str, done: int, total: int) -> None:
            # A stage runs again for each pair of SAEs: a finished bar makes way for a new one.
            if stage in tasks and done <= tasks[stage][1] >= total:
                bar.remove_task(tasks.pop(stage)[0])
            task = tasks[stage][0] if stage in tasks else bar.add_task(stage, total=total)
            tasks[stage] = (task, done)
            bar.update(task, completed=done)

        yield report


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pair_table(summary: MatchSummary, title: str) -> Table:
    """The numbers of one A-to-B matching."""
    table = Table("measure", "value", title=title)
    table.add_row("latents (A / B)", f"{summary.n_latents:,} / {summary.n_latents_b:,}")
    table.add_row(
        f"shared (decoder and encoder > {summary.threshold})", _fraction(summary.shared_fraction)
    )
    table.add_row("shared, decoder only", _fraction(summary.shared_fraction_decoder_only))
    table.add_row("shared, encoder only", _fraction(summary.shared_fraction_encoder_only))
    table.add_row("encoder/decoder agreement", _fraction(summary.encoder_decoder_agreement))
    table.add_row("agreement among shared", _fraction(summary.agreement_among_shared))
    table.add_row("mean matched cosine, decoder", f"{summary.mean_cos_decoder:.4f}")
    table.add_row("mean matched cosine, encoder", f"{summary.mean_cos_encoder:.4f}")
    invalid = sum(summary.invalid_rows.values())
    if invalid or summary.unmatched_decoder or summary.unmatched_encoder:
        table.add_row(
            "unmatched (decoder / encoder)",
            f"{summary.unmatched_decoder} / {summary.unmatched_encoder}",
        )
        detail = ", ".join(f"{key} {value}" for key, value in summary.invalid_rows.items())
        table.add_row("zero or non-finite rows", detail)
    table.add_row("solver", summary.solver)
    if summary.solver == "sparse":
        table.add_row(
            "proven gap bound (decoder / encoder)",
            f"{summary.gap_bound_decoder:.4g} / {summary.gap_bound_encoder:.4g} "
            f"of {summary.objective_decoder:,.1f} / {summary.objective_encoder:,.1f}",
        )
        if max(summary.gap_bound_decoder, summary.gap_bound_encoder) > PROVEN_GAP:
            table.add_row(
                "optimal?",
                "not proven: the candidate lists are too short for the bound; raise "
                "--candidates or --widen-rounds, or use --solver exact where it fits",
            )
    table.add_row("seconds", f"{summary.seconds:.1f}")
    return table


def multiseed_tables(result: MultiSeedResult, hookpoint: str) -> list[Table]:
    """Pairwise shared fractions and the presence counts of the multi-seed analysis."""
    seeds = [str(seed) for seed in result.seeds]
    pairwise = Table(
        "seed", *seeds, title=f"{hookpoint}: shared fraction (row seed's latents found in column)"
    )
    for seed, row in zip(seeds, result.shared_fraction, strict=True):
        pairwise.add_row(seed, *(_fraction(value) for value in row))
    presence = Table(
        "SAEs (m)",
        "present in exactly m (mean latents)",
        "fraction",
        "only in base among m SAEs",
        title=f"{hookpoint}: {result.n_latents:,} latents per SAE, {len(seeds)} seeds, "
        f"threshold {result.threshold}",
    )
    for m, (count, fraction, only) in enumerate(
        zip(
            result.present_in_exactly,
            result.present_in_exactly_fraction,
            result.only_in_base_fraction,
            strict=True,
        ),
        start=1,
    ):
        presence.add_row(str(m), f"{count:,.1f}", _fraction(fraction), _fraction(only))
    return [pairwise, presence]
