"""The score loop under store faults, on real SQLite and PostgreSQL: a lease renewal that meets
a lock timeout is retried (and a lease that cannot be renewed in time is given up, not kept),
workers whose connections are terminated mid-run reconnect and finish every job exactly once,
and a job that fails cancels the work it still has in flight."""

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import LLM_FREE_JOB, add_planted_windows, plant_small, queue_jobs
from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.pool import NullPool
from test_queue import job_states, make_run, queue_latents

from service.config import LLMConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store, make_engine, normalize_url, open_store, upgrade
from service.store.models import Explanation, Job, Score
from service.store.queue import LeaseKeeper, claim

LOCK_TIMEOUT_MS = 100


@pytest.fixture
def impatient_store(store: Store, store_url: str) -> Iterator[Store]:
    """A second handle on `store` whose writes give up after LOCK_TIMEOUT_MS waiting for a
    lock (SQLite's busy timeout, PostgreSQL's lock_timeout) instead of a minute or forever."""
    engine = make_engine(store_url)

    def impatient(dbapi_connection: Any, _record: Any) -> None:
        if engine.dialect.name == "sqlite":
            dbapi_connection.execute(f"PRAGMA busy_timeout = {LOCK_TIMEOUT_MS}")
        else:
            dbapi_connection.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
            dbapi_connection.commit()

    event.listen(engine, "connect", impatient)
    handle = Store(engine)
    yield handle
    handle.dispose()


@contextmanager
def job_locked(store: Store, job_id: int) -> Iterator[None]:
    """Hold a write lock that a renewal of `job_id` must wait for: the row's lock on
    PostgreSQL, the database's single write lock on SQLite."""
    with store.session() as session, session.begin():
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        yield


def test_lease_keeper_rides_out_a_renewal_that_times_out(store: Store, impatient_store: Store):
    queue_latents(store, 1)
    leases = claim(store, "w1", lease_seconds=1.0)
    with LeaseKeeper(impatient_store, leases, lease_seconds=1.0) as keeper:
        time.sleep(0.1)
        # Across the renewal due at 0.33 s: it times out on the lock, and again on its retry.
        with job_locked(store, leases[0].job_id):
            time.sleep(0.5)
        time.sleep(1.0)  # past the claim's expiry: only the retried renewal kept the lease
        assert keeper.held(leases[0])
        assert claim(store, "w2") == []


def test_lease_keeper_gives_up_a_lease_it_cannot_renew_in_time(
    store: Store, impatient_store: Store, caplog: pytest.LogCaptureFixture
):
    queue_latents(store, 1)
    leases = claim(store, "w1", lease_seconds=0.6)
    with (
        caplog.at_level(logging.WARNING, logger="service.store.queue"),
        LeaseKeeper(impatient_store, leases, lease_seconds=0.6) as keeper,
    ):
        with job_locked(store, leases[0].job_id):
            time.sleep(1.0)
        # The lease ran out while the store was locked: the job is no longer this worker's
        # to write, and the keeper says so rather than hold on to it.
        assert not keeper.held(leases[0])
        assert keeper.leases == []
        assert f"giving up jobs {leases[0].job_id}" in caplog.text
        # Claimed again by the same worker (a later attempt), the job is held and renewed.
        claimed_at = time.monotonic()
        (again,) = claim(store, "w1", lease_seconds=0.6)
        assert again.job_id == leases[0].job_id and again.attempt == 2
        keeper.add(again, claimed_at)
        time.sleep(1.0)
        assert keeper.held(again) and not keeper.held(leases[0])
        assert claim(store, "w2") == []


def planted_jobs(store: Store, tokenizer: Any, corpus_windows: np.ndarray, n: int) -> list[int]:
    """`n` LLM-free score jobs on latents that all fire by a planted rule."""
    latents = make_run(store, n)
    planted = plant_small("return", corpus_windows, tokenizer)
    with store.session() as session, session.begin():
        for latent_id in latents:
            add_planted_windows(session, latent_id, planted)
        assert queue_jobs(session, latents, "explain", LLM_FREE_JOB) == n
    return latents


def unreachable_llm() -> OpenAIClient:
    # Never contacted: a client to a closed port proves that no request is made.
    return OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))


def terminate_others(admin: Connection) -> int:
    """What a database restart does to every other session: end it. Returns how many."""
    return len(
        admin.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).all()
    )


def waiting_on_locks(admin: Connection) -> int:
    return int(
        admin.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    )


def restarts(admin: Engine, stop: threading.Event, terminated: list[int]) -> None:
    """End the workers' sessions: first while they write results (their INSERTs held up by
    a table lock until then), then every half second, whatever they are doing."""
    with admin.connect() as connection, connection.begin():
        connection.execute(text("LOCK TABLE explanation IN EXCLUSIVE MODE"))
        while waiting_on_locks(connection) == 0 and not stop.wait(0.05):
            pass
        terminated.append(terminate_others(connection))
    while not stop.wait(0.5):
        with admin.connect() as connection:
            terminated.append(terminate_others(connection))


def test_workers_reconnect_after_their_connections_are_terminated(
    postgres_url: str, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    upgrade(postgres_url)
    store = open_store(postgres_url)
    admin = create_engine(normalize_url(postgres_url), poolclass=NullPool)
    n = 12
    try:
        planted_jobs(store, tokenizer, corpus_windows, n)
        stop = threading.Event()
        terminated: list[int] = []
        killer = threading.Thread(target=restarts, args=(admin, stop, terminated))
        killer.start()
        try:
            loop = ScoreWorkers(
                store, unreachable_llm(), home, workers=4, lease_seconds=30, poll_seconds=0.05
            )
            stats = asyncio.run(loop.run())
        finally:
            stop.set()
            killer.join()
        assert terminated[0] > 0 and stats.failed == 0
        assert job_states(store) == {"done": n}
        with store.read_session() as session:
            explained = Counter(session.scalars(select(Explanation.job_id)))
            scored = Counter(session.scalars(select(Score.job_id)))
            errors = session.scalars(select(Job.last_error)).all()
        # Each job's results written once: none lost, none twice.
        assert len(explained) == n and set(explained.values()) == set(scored.values()) == {1}
        # The jobs whose write was cut off went back to the queue, and were done again.
        handed_back = [error for error in errors if error and error.startswith("store unavail")]
        assert handed_back and stats.requeued >= len(handed_back)
    finally:
        store.dispose()
        admin.dispose()


def test_a_failed_request_cancels_the_jobs_other_requests():
    """asyncio.gather hands back the first error and leaves the other requests running; the
    worker cancels whatever the job still has in flight before it hands the job back."""

    async def scenario() -> tuple[bool, bool]:
        cancelled = asyncio.Event()

        async def slow_request() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def failing_request() -> None:
            await asyncio.sleep(0.01)
            raise ConnectionError("the server went away")

        async def pipeline() -> None:
            await asyncio.gather(slow_request(), failing_request())

        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()
        loop.set_task_factory(ScoreWorkers._task_factory(previous))
        try:
            with pytest.raises(ConnectionError):
                await ScoreWorkers._contained(pipeline())
            cancelled_at_once = cancelled.is_set()
            # A job that succeeds leaves nothing behind either, and other work is untouched.
            bystander = asyncio.create_task(asyncio.sleep(0.05))
            await ScoreWorkers._contained(asyncio.sleep(0))
            return cancelled_at_once, not bystander.cancelled() and await bystander is None
        finally:
            loop.set_task_factory(previous)

    assert asyncio.run(scenario()) == (True, True)
