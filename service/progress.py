"""The rich progress bar every long stage shows: done of total, rate and ETA."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


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
