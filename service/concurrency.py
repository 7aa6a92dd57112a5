"""Running a job's coroutines together so that the first failure stops all of them.

`asyncio.gather` hands back the first error and leaves the other coroutines running: when one
LLM request of a job fails for good, its sibling requests would go on spending server time
after the job was handed back. `gather_or_cancel` cancels them first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_or_cancel(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    """Run `coroutines` concurrently and return their results in order. When one raises, the
    others are cancelled and have ended before its exception is raised, as itself (not in an
    ExceptionGroup), so callers catch the errors they know. Cancelling the caller cancels
    them all."""
    tasks: list[asyncio.Task[T]] = []
    first_error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failed:
        # The group lists the error that cancelled the rest first; the rest were cancelled.
        first_error = failed.exceptions[0]
    if first_error is not None:
        # Raised outside the except block, so that the group is not chained to it.
        raise first_error
    return [task.result() for task in tasks]
