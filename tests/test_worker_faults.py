"""The score loop under store faults, on real SQLite and PostgreSQL: a lease renewal that meets
a lock timeout is retried (and a lease that cannot be renewed in time is given up, not kept),
workers whose connections are terminated mid-run reconnect and finish every job exactly once,
and a job whose request fails has its other requests cancelled before it is handed back."""

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

from service.concurrency import gather_or_cancel
from service.config import LLMConfig, ScoreConfig
from service.llm.base import ServerStats
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


async def request(name: str, seconds: float, log: list[str], error: str | None = None) -> str:
    """Stands for one LLM request of a job: takes `seconds`, then answers or fails; `log`
    says how it ended."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        log.append(f"{name} cancelled")
        raise
    if error is not None:
        log.append(f"{name} failed")
        raise ConnectionError(error)
    log.append(f"{name} answered")
    return name


def test_gather_or_cancel_returns_the_results_in_order():
    log: list[str] = []
    results = asyncio.run(gather_or_cancel(request("slow", 0.05, log), request("quick", 0.0, log)))
    assert results == ["slow", "quick"]
    assert log == ["quick answered", "slow answered"]


def test_gather_or_cancel_cancels_the_siblings_of_a_failure_before_it_raises():
    log: list[str] = []

    async def job() -> None:
        try:
            await gather_or_cancel(
                request("sibling-1", 30, log),
                request("failing", 0.01, log, error="the server went away"),
                request("sibling-2", 30, log),
            )
        except ConnectionError as error:  # the request's own error, not an ExceptionGroup
            log.append(f"job handed back: {error}")

    asyncio.run(asyncio.wait_for(job(), 10))
    assert log[0] == "failing failed"
    assert sorted(log[1:3]) == ["sibling-1 cancelled", "sibling-2 cancelled"]
    assert log[3:] == ["job handed back: the server went away"]


def test_cancelling_gather_or_cancel_cancels_every_request():
    log: list[str] = []

    async def interrupted() -> None:
        task = asyncio.create_task(
            gather_or_cancel(request("first", 30, log), request("second", 30, log))
        )
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert sorted(log) == ["first cancelled", "second cancelled"]


@pytest.mark.vllm
def test_a_job_whose_request_fails_cancels_its_other_requests_before_it_is_handed_back(
    tmp_path: Path, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    """One job, its detection scorer asking one window per request, sent to the real vLLM
    server and to a port where nothing listens, in turn, with no retry: the first request
    sent to the dead port fails the job while requests of the same job are in flight at vLLM.
    When the job is handed back (the progress callback, called once the job is back in the
    queue) none of them still runs."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    latents = make_run(store, 1)
    config = ScoreConfig(
        explainers=["token_baseline"],
        scorers=["detection"],
        shuffled_control=False,
        cross_seed=0,
        n_explain_top=4,
        n_explain_quantile=2,
        n_positive=4,
        n_negative=4,
        examples_per_request=1,
    )
    with store.session() as session, session.begin():
        add_planted_windows(session, latents[0], plant_small("return", corpus_windows, tokenizer))
        queue_jobs(session, latents, "explain", config)
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    llm = OpenAIClient(LLMConfig(urls=[vllm_url, dead_url], retry_for_s=0, max_concurrency=8))
    at_hand_back: list[list[ServerStats]] = []
    loop = ScoreWorkers(store, llm, home, workers=1, max_jobs=1)
    loop.on_progress = lambda _stats: at_hand_back.append(llm.servers())

    async def run() -> None:
        try:
            await loop.run()
        finally:
            await llm.aclose()

    try:
        asyncio.run(run())
        with store.read_session() as session:
            job = session.scalars(select(Job)).one()
    finally:
        store.dispose()
    assert (job.state, job.attempts) == ("queued", 1)
    assert job.last_error is not None and job.last_error.startswith("LLM unavailable")
    ((vllm, dead),) = at_hand_back
    assert dead.errors >= 1
    # Requests of the job had gone to vLLM, and none was left running there.
    assert vllm.requests >= 1 and vllm.in_flight == 0
