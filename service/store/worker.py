"""A queue worker loop: claim a batch, keep its leases alive, do each job, write its results
and its completion in one transaction, record failures, repeat until the stage is drained.

A stage supplies `process(lease)`, which does the slow part (LLM calls...) outside any
transaction and returns `write(session)`, which adds the results to the session that then
completes the job. The split keeps SQLite's write lock short and makes results and
completion atomic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.engine import Store
from service.store.models import Job
from service.store.queue import (
    DEFAULT_LEASE_SECONDS,
    Lease,
    LeaseKeeper,
    LeaseLost,
    claim,
    complete,
    fail,
    new_worker_id,
)

Writer = Callable[[Session], None]
Processor = Callable[[Lease], Writer]


@dataclass
class WorkerStats:
    owner: str
    completed: int = 0
    failed: int = 0
    lost: int = 0


def unfinished(store: Store, stage: str) -> int:
    """Jobs of `stage` still queued or leased (some perhaps to workers that died)."""
    with store.read_session() as session:
        count = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.stage == stage, Job.state.in_(("queued", "leased")))
        )
    return int(count or 0)


def work(
    store: Store,
    stage: str,
    process: Processor,
    *,
    owner: str | None = None,
    batch: int = 1,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    poll_seconds: float = 1.0,
    max_jobs: int | None = None,
) -> WorkerStats:
    """Work on `stage` until no job is queued or leased (or `max_jobs` are done).

    While other workers hold leases the loop waits and polls, so jobs of a worker that died
    are picked up once their leases expire.
    """
    stats = WorkerStats(owner or new_worker_id())
    while max_jobs is None or stats.completed + stats.failed < max_jobs:
        leases = claim(store, stats.owner, batch, stage, lease_seconds)
        if not leases:
            if unfinished(store, stage) == 0:
                break
            time.sleep(poll_seconds)
            continue
        with LeaseKeeper(store, leases, lease_seconds) as keeper:
            for lease in leases:
                if not keeper.held(lease):
                    stats.lost += 1
                    continue
                _run_one(store, lease, process, stats)
                keeper.release(lease)
    return stats


def _run_one(store: Store, lease: Lease, process: Processor, stats: WorkerStats) -> None:
    try:
        write = process(lease)
        with store.session() as session, session.begin():
            write(session)
            complete(session, lease)
        stats.completed += 1
    except LeaseLost:
        stats.lost += 1
    except Exception as error:  # one job's failure is recorded on the job, not fatal here
        try:
            fail(store, lease, f"{type(error).__name__}: {error}")
            stats.failed += 1
        except LeaseLost:
            stats.lost += 1
