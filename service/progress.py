"""The rich progress bars long stages show: tokens done with their rate and ETA
(`token_progress`), and counted items (latents, rules, rows) with the stage's own figures
(`count_progress`)."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextmanager
def token_progress(
    label: str, console: Console | None = None, unit: str = "tokens", show: bool = True
) -> Iterator[Callable[..., None]]:
    """Yield `update(done, total, status="")`.

    The bar starts where the first update puts it, so a resumed job does not report the work
    of an earlier call as its speed.
    """
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not show,
    )
    with progress:
        task = progress.add_task(label, total=1, rate="", status="")
        started = False

        def update(done: int, total: int, status: str = "") -> None:
            nonlocal started
            if not started:
                started = True
                progress.reset(task, total=total, completed=done, rate="", status=status)
                return
            progress.update(task, completed=done, status=status)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:,.0f} {unit}/s" if speed else "")

        yield update


def count_progress(
    label: str,
    *figures: str | ProgressColumn,
    console: Console | None = None,
    transient: bool = False,
) -> Progress:
    """A bar of items done of total, then `figures` (a column, or a text template over the
    task's fields such as "{task.fields[rate]:.1f} latents/min"), elapsed time and ETA.
    `label` is a text template too: "{task.description}" names each task of a shared bar."""
    columns = [TextColumn(figure) if isinstance(figure, str) else figure for figure in figures]
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
