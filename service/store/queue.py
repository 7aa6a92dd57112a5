"""The durable job queue: rows of the `job` table that many workers on many machines share.

A job is (latent, stage, campaign); enqueueing the same triple again does nothing. A worker
claims only jobs of campaigns its LLM can serve (`campaigns.served_by`). A
worker `claim`s jobs: each claim hands a job to exactly one worker (PostgreSQL row locks with
SKIP LOCKED, SQLite's single writer under BEGIN IMMEDIATE), counts an attempt and grants a
lease. The worker `renew`s the lease while it works (`LeaseKeeper` does so in a thread) and
ends with `complete` (inside the session that writes its results, so both commit together)
or `fail` (requeued until `max_attempts`, then failed with its last error); a worker that is
stopped mid-job `release`s it (queued again, the attempt not counted). A lease that runs
out makes the job claimable again; a lease that runs out on the last attempt fails the job.
A renewal that meets a lost connection or a lock timeout is retried until the lease would
run out; then the keeper gives the job up (`held` turns false) rather than let the worker
write results that another worker may be producing too.

The lease is fenced by (owner, attempt): a worker whose lease expired and whose job was
claimed again gets `LeaseLost` from `complete`, and its transaction, results included, rolls
back, so no job's results are ever written twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy import and_, case, func, or_, select, true, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from service.config import ScoringConfig
from service.store.campaigns import served_by
from service.store.engine import Store, store_now
from service.store.models import JOB_STATES, Campaign, Job, LlmCall

DEFAULT_LEASE_SECONDS: float = ScoringConfig.model_fields["lease_seconds"].default
DEFAULT_MAX_ATTEMPTS = 3
# Rows per INSERT: well under SQLite's 32,766 bound parameters at 6 columns a row.
ENQUEUE_CHUNK = 1000
# Back-off between tries of a database operation that met a transient error.
RETRY_FIRST_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 2.0
# How long a worker keeps retrying the store before it gives up: long enough for a database
# server to restart.
DEFAULT_DB_RETRY_SECONDS = 300.0

log = logging.getLogger(__name__)


def transient(error: BaseException) -> bool:
    """A database error that the same operation may not meet again: a lost connection (the
    server restarted, the connection was terminated) or a lock or busy timeout. Both drivers
    raise those as OperationalError; SQLAlchemy flags any other error that cost the
    connection as `connection_invalidated`."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def next_delay(delay: float) -> float:
    return min(delay * 2, RETRY_MAX_DELAY_S)


class LeaseLost(Exception):
    """This worker no longer holds the job: its lease ran out and another worker claimed it
    (or it was completed or failed already). Roll back; the job's results are not ours."""


@dataclass(frozen=True)
class Lease:
    """A claimed job as the worker sees it; `owner` and `attempt` together fence the lease."""

    job_id: int
    latent_id: int
    stage: str
    campaign_id: int
    attempt: int
    owner: str
    expires_at: datetime


def new_worker_id() -> str:
    """An owner name unique across machines and processes, readable in `job.lease_owner`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def enqueue(
    session: Session,
    latent_ids: Iterable[int],
    stage: str,
    campaign_id: int,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> int:
    """Queue `stage` for each latent in campaign `campaign_id`; returns how many jobs were new.

    Runs in the caller's session (commit it). Jobs already queued, running or finished in
    the same campaign are left exactly as they are.
    """
    now = store_now(session)
    insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    ids = list(dict.fromkeys(latent_ids))
    inserted = 0
    for start in range(0, len(ids), ENQUEUE_CHUNK):
        rows = [
            {
                "latent_id": latent_id,
                "stage": stage,
                "campaign_id": campaign_id,
                "state": "queued",
                "attempts": 0,
                "max_attempts": max_attempts,
                "created_at": now,
                "updated_at": now,
            }
            for latent_id in ids[start : start + ENQUEUE_CHUNK]
        ]
        statement = (
            insert(Job)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["latent_id", "stage", "campaign_id"])
            .returning(Job.id)
        )
        # Counting returned ids: rowcount is not reliable for multi-row inserts on psycopg.
        inserted += len(session.execute(statement).all())
    return inserted


def _servable(llm: tuple[str, str] | None) -> Any:
    """Jobs of campaigns the LLM `(backend, model)` serves; every job when None."""
    if llm is None:
        return true()
    return Job.campaign_id.in_(select(Campaign.id).where(served_by(*llm)))


def _key(lease: Lease) -> tuple[int, int]:
    """A lease's identity: the same job may be leased again, under a later attempt."""
    return (lease.job_id, lease.attempt)


def _lease_is_ours(lease: Lease) -> Any:
    return and_(
        Job.id == lease.job_id,
        Job.state == "leased",
        Job.lease_owner == lease.owner,
        Job.attempts == lease.attempt,
    )


def claim(
    store: Store,
    owner: str,
    n: int = 1,
    stage: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    llm: tuple[str, str] | None = None,
) -> list[Lease]:
    """Lease up to `n` claimable jobs (queued, or leased with an expired lease) to `owner`;
    with `llm` (backend, model), only jobs of campaigns that LLM serves.

    Commits at once. Oldest jobs first. Jobs whose lease ran out on their last attempt are
    marked failed here rather than handed out again.
    """
    with store.session() as session, session.begin():
        now = store_now(session)
        expires_at = now + timedelta(seconds=lease_seconds)
        stage_filter = Job.stage == stage if stage is not None else true()
        expired = and_(Job.state == "leased", Job.lease_expires_at < now)
        session.execute(
            update(Job)
            .where(stage_filter, expired, Job.attempts >= Job.max_attempts)
            .values(
                state="failed",
                last_error="lease expired on the last attempt: its worker stopped or stalled",
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        # Lock the ids first, then update exactly those: as a subquery of the UPDATE, the
        # LIMIT ... SKIP LOCKED select may be run again for each row (a nested-loop plan), skip
        # the rows the UPDATE has just changed, and so lease far more than n.
        ids = session.scalars(
            select(Job.id)
            .where(stage_filter, _servable(llm), or_(Job.state == "queued", expired))
            .order_by(Job.id)
            .limit(n)
            .with_for_update(skip_locked=True)
        ).all()
        if not ids:
            return []
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(
                state="leased",
                lease_owner=owner,
                lease_expires_at=expires_at,
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .returning(Job.id, Job.latent_id, Job.stage, Job.campaign_id, Job.attempts)
            .execution_options(synchronize_session=False)
        ).all()
    return sorted(
        (
            Lease(
                job_id=row.id,
                latent_id=row.latent_id,
                stage=row.stage,
                campaign_id=row.campaign_id,
                attempt=row.attempts,
                owner=owner,
                expires_at=expires_at,
            )
            for row in rows
        ),
        key=lambda lease: lease.job_id,
    )


def renew(
    store: Store, leases: Sequence[Lease], lease_seconds: float = DEFAULT_LEASE_SECONDS
) -> list[Lease]:
    """Extend the leases this worker still holds; returns those, with their new expiry.

    A lease missing from the answer was lost: stop working on that job.
    """
    if not leases:
        return []
    with store.session() as session, session.begin():
        expires_at = store_now(session) + timedelta(seconds=lease_seconds)
        renewed = {
            (row.id, row.attempts)
            for row in session.execute(
                update(Job)
                .where(or_(*(_lease_is_ours(lease) for lease in leases)))
                .values(lease_expires_at=expires_at)
                .returning(Job.id, Job.attempts)
                .execution_options(synchronize_session=False)
            )
        }
    return [replace(lease, expires_at=expires_at) for lease in leases if _key(lease) in renewed]


def complete(session: Session, lease: Lease) -> None:
    """Mark the job done inside the caller's session, beside the results it writes.

    Raises `LeaseLost` if this worker no longer holds the job; the caller must then let its
    transaction roll back so that the results are not written twice.
    """
    now = store_now(session)
    done = session.execute(
        update(Job)
        .where(_lease_is_ours(lease))
        .values(state="done", lease_expires_at=None, finished_at=now, updated_at=now)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if done is None:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to {lease.owner}")


def fail(store: Store, lease: Lease, error: str, retry: bool = True) -> str:
    """Record a failed attempt: requeue the job, or (out of attempts, or `retry` False) mark it
    failed. Returns the job's new state; raises `LeaseLost` if the job is no longer ours."""
    with store.session() as session, session.begin():
        now = store_now(session)
        give_up = Job.attempts >= Job.max_attempts if retry else true()
        state = session.execute(
            update(Job)
            .where(_lease_is_ours(lease))
            .values(
                state=case((give_up, "failed"), else_="queued"),
                last_error=error,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=case((give_up, now), else_=None),
                updated_at=now,
            )
            .returning(Job.state)
            .execution_options(synchronize_session=False)
        ).scalar()
    if state is None:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to {lease.owner}")
    return str(state)


def release(store: Store, lease: Lease, note: str) -> None:
    """Hand an unfinished job back without counting the attempt (its worker was stopped, the
    job did not fail): it is queued again as it was. `note` becomes its last error. Raises
    `LeaseLost` if the job is no longer ours."""
    with store.session() as session, session.begin():
        released = session.execute(
            update(Job)
            .where(_lease_is_ours(lease))
            .values(
                state="queued",
                attempts=Job.attempts - 1,
                last_error=note,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=store_now(session),
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).first()
    if released is None:
        raise LeaseLost(f"job {lease.job_id} is no longer leased to {lease.owner}")


@dataclass
class LeaseKeeper:
    """Renews a worker's leases from a background thread, between `start` and `stop` (or
    throughout a `with` block). One keeper can serve many jobs: `add` each claimed lease and
    `release` it once the job is finished.

    A renewal that fails on a transient database error is tried again, backing off, until a
    lease would run out; that lease is then given up and lands in `lost` (as job id and
    attempt: this process may claim the job again later). Check `held(lease)` before writing.
    """

    store: Store
    leases: list[Lease]
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    lost: set[tuple[int, int]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    # By this process's monotonic clock, when each lease runs out: counted from the start of
    # the claim or renewal that set it, so not later than the store's own expiry.
    _deadlines: dict[tuple[int, int], float] = field(init=False)

    def __post_init__(self) -> None:
        # Leases handed in here were claimed moments ago, at a time the keeper does not know.
        now = time.monotonic()
        self._deadlines = {_key(lease): now + self.lease_seconds for lease in self.leases}

    def __enter__(self) -> LeaseKeeper:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-keeper")
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and wait for the thread (which may be waiting on the store: from
        async code, call this in a thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def add(self, lease: Lease, claimed_at: float) -> None:
        """Keep renewing `lease`, claimed by a call that began at `claimed_at` (monotonic)."""
        with self._lock:
            self.leases.append(lease)
            self._deadlines[_key(lease)] = claimed_at + self.lease_seconds

    def held(self, lease: Lease) -> bool:
        with self._lock:
            return _key(lease) not in self.lost

    def release(self, lease: Lease) -> None:
        """Stop renewing a job that is finished (completed or failed)."""
        with self._lock:
            self.leases = [other for other in self.leases if _key(other) != _key(lease)]
            self._deadlines.pop(_key(lease), None)

    def _run(self) -> None:
        # Renew at a third of the lease so that two missed renewals still leave time.
        while not self._stop.wait(self.lease_seconds / 3):
            self._renew()

    def _renew(self) -> None:
        delay = RETRY_FIRST_DELAY_S
        while not self._stop.is_set():
            with self._lock:
                current = list(self.leases)
            if not current:
                return
            started = time.monotonic()
            try:
                renewed = renew(self.store, current, self.lease_seconds)
            except Exception as error:  # this thread must outlive any error, or leases lapse
                if not self._give_up_lapsing(time.monotonic() + delay, error):
                    return
                self._stop.wait(delay)
                delay = next_delay(delay)
                continue
            kept = {_key(lease) for lease in renewed}
            with self._lock:
                # Leases added while the renewal ran were not part of it: they stay as they are;
                # those released meanwhile are finished and need nothing more.
                still = {_key(lease) for lease in self.leases}
                for lease in current:
                    if _key(lease) not in still:
                        continue
                    if _key(lease) in kept:
                        self._deadlines[_key(lease)] = started + self.lease_seconds
                    else:
                        self._lose(lease)
                self.leases = [lease for lease in self.leases if _key(lease) not in self.lost]
            return

    def _give_up_lapsing(self, retry_at: float, error: Exception) -> bool:
        """Give up the leases that would run out before a renewal tried at `retry_at` could
        save them; returns whether any lease is left to retry for."""
        with self._lock:
            lapsing = [lease for lease in self.leases if self._deadlines[_key(lease)] <= retry_at]
            for lease in lapsing:
                self._lose(lease)
            self.leases = [lease for lease in self.leases if _key(lease) not in self.lost]
            left = bool(self.leases)
        if lapsing:
            log.warning(
                "giving up jobs %s: their leases could not be renewed before running out (%s: %s)",
                ", ".join(str(lease.job_id) for lease in lapsing),
                type(error).__name__,
                error,
            )
        else:
            log.info("lease renewal failed, retrying (%s: %s)", type(error).__name__, error)
        return left

    def _lose(self, lease: Lease) -> None:
        # Called with the lock held.
        self.lost.add(_key(lease))
        self._deadlines.pop(_key(lease), None)


@dataclass
class StageStatus:
    """One stage's jobs by state, the recent completion rate and the time left at that rate."""

    stage: str
    counts: dict[str, int]
    rate_per_s: float | None
    eta_s: float | None

    @property
    def remaining(self) -> int:
        return self.counts["queued"] + self.counts["leased"]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class ServerStatus:
    """The LLM calls one server answered for finished jobs (`llm_call`), all time and
    recently; `errors` counts failed attempts (a request retried elsewhere is one of them)."""

    base_url: str
    requests: int
    errors: int
    recent_requests: int
    recent_errors: int


@dataclass
class QueueStatus:
    stages: list[StageStatus]
    total: StageStatus
    servers: list[ServerStatus] = field(default_factory=list)


def _rate(done_recently: int, first_finished: datetime | None, now: datetime) -> float | None:
    # n completions at t1..tn span n-1 intervals; measuring to `now` rather than to tn lets
    # the rate decay once workers stop, so the ETA does not promise work nobody is doing.
    if done_recently < 2 or first_finished is None:
        return None
    span = (now - first_finished).total_seconds()
    return (done_recently - 1) / span if span > 0 else None


def _stage_status(
    stage: str, counts: dict[str, int], recent: int, first: datetime | None, now: datetime
) -> StageStatus:
    rate = _rate(recent, first, now)
    status = StageStatus(stage, counts, rate, None)
    if rate:
        status.eta_s = status.remaining / rate
    elif status.remaining == 0:
        status.eta_s = 0.0
    return status


def status(store: Store, window_s: float = 600.0, campaign_id: int | None = None) -> QueueStatus:
    """Counts by stage and state, with the completion rate over the last `window_s` seconds;
    of one campaign's jobs and calls when `campaign_id` is given."""
    of_jobs = Job.campaign_id == campaign_id if campaign_id is not None else true()
    of_calls = LlmCall.campaign_id == campaign_id if campaign_id is not None else true()
    with store.read_session() as session:
        now = store_now(session)
        counts: dict[str, dict[str, int]] = {}
        for stage, state, count in session.execute(
            select(Job.stage, Job.state, func.count()).where(of_jobs).group_by(Job.stage, Job.state)
        ):
            counts.setdefault(stage, dict.fromkeys(JOB_STATES, 0))[state] = count
        recent: dict[str, tuple[int, datetime | None]] = {}
        for stage, count, first in session.execute(
            select(Job.stage, func.count(), func.min(Job.finished_at))
            .where(
                of_jobs, Job.state == "done", Job.finished_at >= now - timedelta(seconds=window_s)
            )
            .group_by(Job.stage)
        ):
            recent[stage] = (count, first)
        is_recent = LlmCall.created_at >= now - timedelta(seconds=window_s)
        servers = [
            ServerStatus(url, int(n), int(errors), int(n_recent or 0), int(errors_recent or 0))
            for url, n, errors, n_recent, errors_recent in session.execute(
                select(
                    LlmCall.base_url,
                    func.count(),
                    func.count(LlmCall.error),
                    func.sum(case((is_recent, 1), else_=0)),
                    func.sum(case((is_recent & LlmCall.error.is_not(None), 1), else_=0)),
                )
                .where(of_calls)
                .group_by(LlmCall.base_url)
                .order_by(LlmCall.base_url)
            )
        ]
    stages = [
        _stage_status(stage, counts[stage], *recent.get(stage, (0, None)), now)
        for stage in sorted(counts)
    ]
    total_counts = {state: sum(stage.counts[state] for stage in stages) for state in JOB_STATES}
    firsts = [first for _, first in recent.values() if first is not None]
    total = _stage_status(
        "all",
        total_counts,
        sum(count for count, _ in recent.values()),
        min(firsts) if firsts else None,
        now,
    )
    return QueueStatus(stages, total, servers)


def unfinished(store: Store, stage: str, llm: tuple[str, str] | None = None) -> int:
    """Jobs of `stage` still queued or leased (some perhaps to workers that died); with
    `llm`, only those of campaigns that LLM serves."""
    with store.read_session() as session:
        count = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.stage == stage, Job.state.in_(("queued", "leased")), _servable(llm))
        )
    return int(count or 0)


def unfinished_campaigns(store: Store, stage: str) -> list[Campaign]:
    """The campaigns with queued or leased jobs of `stage`."""
    with store.read_session() as session:
        return list(
            session.scalars(
                select(Campaign).where(
                    Campaign.id.in_(
                        select(Job.campaign_id).where(
                            Job.stage == stage, Job.state.in_(("queued", "leased"))
                        )
                    )
                )
            )
        )


def retry_failed(session: Session, campaign_id: int, stage: str) -> int:
    """Queue the failed `stage` jobs of a campaign again with fresh attempts; returns how
    many. Their last error stays on record until they run again."""
    return len(
        session.execute(
            update(Job)
            .where(Job.campaign_id == campaign_id, Job.stage == stage, Job.state == "failed")
            .values(state="queued", attempts=0, finished_at=None, updated_at=store_now(session))
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).all()
    )
