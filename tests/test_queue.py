"""The job queue on real SQLite and PostgreSQL: idempotent enqueue, exclusive claims, leases
that expire and are fenced, attempts and failure, status, and choosing latents to queue."""

import asyncio
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import LLM_FREE_JOB, add_planted_windows, plant_small, queue_jobs
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from sae.errors import UserError
from service.config import LLMConfig, QueueConfig, ScoreConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.scoring.campaign import open_campaign
from service.scoring.worker import ScoreWorkers
from service.store.campaigns import CampaignLLM, campaign_key
from service.store.engine import Store
from service.store.matches import store_match_pair
from service.store.models import Campaign, Example, Explanation, Job, Latent, LlmCall, Sae, Score
from service.store.queue import (
    Lease,
    LeaseKeeper,
    LeaseLost,
    claim,
    complete,
    fail,
    release,
    renew,
    status,
)
from service.store.runs import register_run, register_sae
from service.store.sampling import queue_run
from service.store.windows import version_for_added_windows


def make_run(store: Store, n_latents: int = 20, name: str = "r") -> list[int]:
    """A run with SAEs of seeds 0 and 1; returns the latent ids of seed 0."""
    with store.session() as session, session.begin():
        run = register_run(
            session,
            name,
            subject_model="smollm2",
            hookpoint="h",
            dataset="embedded",
            architecture="topk",
            n_latents=n_latents,
            k=4,
            seeds=[0, 1],
        )
        sae = register_sae(session, run, 0, n_latents=n_latents, d_in=8)
        register_sae(session, run, 1, n_latents=n_latents, d_in=8)
        return list(
            session.scalars(select(Latent.id).where(Latent.sae_id == sae.id).order_by(Latent.index))
        )


def queue_latents(store: Store, n: int, stage: str = "explain", max_attempts: int = 3) -> list[int]:
    latents = make_run(store, n)
    with store.session() as session, session.begin():
        assert queue_jobs(session, latents, stage, {"seed": 1}, max_attempts) == n
    return latents


def in_campaign(session: Session) -> Campaign:
    """The campaign of the default score config and LLM."""
    return open_campaign(session, ScoreConfig(), LLMConfig())


def job_states(store: Store) -> dict[str, int]:
    with store.read_session() as session:
        return dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())


def write_result(lease: Lease):
    def write(session):
        session.add(
            Explanation(
                latent_id=lease.latent_id,
                job_id=lease.job_id,
                explainer="test",
                model=lease.owner,
                campaign_id=lease.campaign_id,
                text=f"attempt {lease.attempt}",
            )
        )

    return write


def test_campaign_key_ignores_key_order_and_names_the_llm():
    llm = CampaignLLM("openai", "m")
    assert campaign_key({"a": 1, "b": [1, 2]}, llm) == campaign_key({"b": [1, 2], "a": 1}, llm)
    assert campaign_key({"a": 1}, llm) != campaign_key({"a": 2}, llm)
    assert campaign_key({"a": 1}, llm) != campaign_key({"a": 1}, CampaignLLM("openai", "other"))
    # The servers are recorded, not keyed: a bigger fleet is the same campaign.
    assert campaign_key({"a": 1}, llm) == campaign_key(
        {"a": 1}, CampaignLLM("openai", "m", ("http://a/v1", "http://b/v1"))
    )


def test_enqueue_is_idempotent_per_latent_stage_and_config(store: Store):
    latents = make_run(store, 10)
    with store.session() as session, session.begin():
        assert queue_jobs(session, latents, "explain", {"seed": 1}) == 10
        assert queue_jobs(session, latents + latents[:3], "explain", {"seed": 1}) == 0
        assert queue_jobs(session, latents[:4], "explain", {"seed": 2}) == 4
        assert queue_jobs(session, latents[:2], "score", {"seed": 1}) == 2
        # The same config with another LLM is another campaign: new jobs, not duplicates.
        other_llm = LLMConfig(model="another-model")
        assert queue_jobs(session, latents[:3], "explain", {"seed": 1}, llm=other_llm) == 3
    assert job_states(store) == {"queued": 19}


def test_claim_leases_oldest_first_and_counts_attempts(store: Store):
    latents = queue_latents(store, 5)
    leases = claim(store, "w1", n=3, stage="explain", lease_seconds=60)
    assert [lease.latent_id for lease in leases] == latents[:3]
    assert all(lease.attempt == 1 and lease.owner == "w1" for lease in leases)
    with store.read_session() as session:
        campaign = session.get(Campaign, leases[0].campaign_id)
        # Stored resolved: every field, so a job never runs "whatever today's defaults are".
        assert campaign is not None and campaign.config == ScoreConfig(seed=1).model_dump(
            mode="json"
        )
    assert len(claim(store, "w2", n=10, stage="explain")) == 2
    assert claim(store, "w3", n=10, stage="explain") == []
    assert claim(store, "w3", n=10, stage="score") == []
    assert job_states(store) == {"leased": 5}


def test_concurrent_claims_hand_each_job_to_one_worker(store: Store):
    queue_latents(store, 300)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        got: list[int] = []
        try:
            while leases := claim(store, owner, n=3, lease_seconds=600):
                got.extend(lease.job_id for lease in leases)
        except BaseException as error:
            errors.append(error)
        claimed[owner] = got

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    every = [job for jobs in claimed.values() for job in jobs]
    assert len(every) == 300 and len(set(every)) == 300
    assert sum(1 for jobs in claimed.values() if jobs) > 1


def test_claim_leases_no_more_than_n_whatever_the_plan(store: Store):
    """claim(n) leases at most n rows and returns each of them. On PostgreSQL the planner is
    steered to a nested loop that runs the LIMIT subquery again for each row it updates (a
    plan it may choose by itself): an UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR UPDATE
    SKIP LOCKED) then skips the rows it just updated and leases the whole queue."""
    if store.backend == "postgresql":

        @event.listens_for(store.engine, "connect")
        def nested_loops(dbapi_connection: Any, _record: Any) -> None:
            for planner in ("hashjoin", "mergejoin", "material", "hashagg", "sort"):
                dbapi_connection.execute(f"SET enable_{planner} = off")
            dbapi_connection.commit()

        store.engine.dispose()
    queue_latents(store, 20)
    leases = claim(store, "w1", n=2, stage="explain")
    assert len(leases) == 2
    with store.read_session() as session:
        leased = set(session.scalars(select(Job.id).where(Job.state == "leased")))
    assert leased == {lease.job_id for lease in leases}
    assert job_states(store) == {"leased": 2, "queued": 18}


def test_claim_leases_exactly_what_it_returns_under_contention(store: Store):
    """Each claim(n) returns at most n leases, and every row it leased is among them: no job
    is left leased to a worker that does not know it holds it."""
    queue_latents(store, 200)
    returned: dict[str, set[int]] = {}
    oversized: list[int] = []
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        got: set[int] = set()
        try:
            while leases := claim(store, owner, n=2, lease_seconds=600):
                if len(leases) > 2:
                    oversized.append(len(leases))
                got.update(lease.job_id for lease in leases)
        except BaseException as error:
            errors.append(error)
        returned[owner] = got

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not oversized
    with store.read_session() as session:
        leased: dict[str, set[int]] = {}
        for job_id, owner in session.execute(select(Job.id, Job.lease_owner)):
            leased.setdefault(owner, set()).add(job_id)
    assert leased == {owner: jobs for owner, jobs in returned.items() if jobs}


def test_expired_lease_is_reclaimed_and_the_old_owner_is_fenced_off(store: Store):
    queue_latents(store, 1)
    (old,) = claim(store, "slow", lease_seconds=0.3)
    assert claim(store, "fast", lease_seconds=60) == []
    time.sleep(0.5)
    (new,) = claim(store, "fast", lease_seconds=60)
    assert new.job_id == old.job_id and new.attempt == 2

    # The slow worker's results and completion roll back together.
    with pytest.raises(LeaseLost), store.session() as session, session.begin():
        write_result(old)(session)
        complete(session, old)
    assert renew(store, [old]) == []
    with pytest.raises(LeaseLost):
        fail(store, old, "late")
    with store.session() as session, session.begin():
        write_result(new)(session)
        complete(session, new)
    with store.read_session() as session:
        texts = session.scalars(select(Explanation.text)).all()
        job = session.get_one(Job, new.job_id)
    assert texts == ["attempt 2"]
    assert (job.state, job.lease_owner, job.attempts) == ("done", "fast", 2)
    assert job.finished_at is not None
    with pytest.raises(LeaseLost), store.session() as session, session.begin():
        complete(session, new)


def test_renewed_lease_is_not_reclaimed(store: Store):
    queue_latents(store, 1)
    (lease,) = claim(store, "w1", lease_seconds=0.4)
    for _ in range(3):
        time.sleep(0.2)
        (lease,) = renew(store, [lease], lease_seconds=0.4)
    assert claim(store, "w2") == []
    with store.session() as session, session.begin():
        complete(session, lease)
    assert job_states(store) == {"done": 1}


def test_lease_keeper_holds_a_lease_past_its_first_expiry(store: Store):
    queue_latents(store, 1)
    leases = claim(store, "w1", lease_seconds=0.3)
    with LeaseKeeper(store, leases, lease_seconds=0.3) as keeper:
        time.sleep(0.8)
        assert claim(store, "w2") == []
        assert keeper.held(leases[0])
    time.sleep(0.5)
    assert len(claim(store, "w2")) == 1


def test_fail_requeues_until_max_attempts_then_keeps_the_error(store: Store):
    queue_latents(store, 1, max_attempts=2)
    (lease,) = claim(store, "w1")
    assert fail(store, lease, "boom 1") == "queued"
    (lease,) = claim(store, "w1")
    assert lease.attempt == 2
    assert fail(store, lease, "boom 2") == "failed"
    assert claim(store, "w1") == []
    with store.read_session() as session:
        job = session.scalars(select(Job)).one()
    assert (job.state, job.attempts, job.last_error) == ("failed", 2, "boom 2")
    assert job.lease_owner is None and job.finished_at is not None


def test_fail_without_retry_fails_at_once(store: Store):
    queue_latents(store, 1)
    (lease,) = claim(store, "w1")
    assert fail(store, lease, "bad input", retry=False) == "failed"


def test_release_requeues_without_counting_the_attempt(store: Store):
    queue_latents(store, 1, max_attempts=1)
    (lease,) = claim(store, "w1")
    release(store, lease, "interrupted")
    with store.read_session() as session:
        job = session.scalars(select(Job)).one()
    assert (job.state, job.attempts, job.last_error) == ("queued", 0, "interrupted")
    assert job.lease_owner is None and job.finished_at is None
    # Its one attempt is still there: released work is never what uses attempts up.
    (again,) = claim(store, "w2")
    assert again.attempt == 1
    with pytest.raises(LeaseLost):
        release(store, lease, "stale")
    with store.session() as session, session.begin():
        complete(session, again)
    assert job_states(store) == {"done": 1}


def test_lease_expiring_on_the_last_attempt_fails_the_job(store: Store):
    queue_latents(store, 1, max_attempts=1)
    claim(store, "dies", lease_seconds=0.2)
    time.sleep(0.4)
    assert claim(store, "w2") == []
    with store.read_session() as session:
        job = session.scalars(select(Job)).one()
    assert job.state == "failed" and "lease expired on the last attempt" in (job.last_error or "")


def test_status_counts_rate_and_eta(store: Store):
    queue_latents(store, 10)
    for lease in claim(store, "w", n=4):
        with store.session() as session, session.begin():
            complete(session, lease)
        time.sleep(0.05)
    (failing,) = claim(store, "w", n=1)
    fail(store, failing, "x", retry=False)
    claim(store, "w", n=1)
    report = status(store)
    (explain,) = report.stages
    assert explain.counts == {"queued": 4, "leased": 1, "done": 4, "failed": 1}
    assert explain.remaining == 5 and report.total.total == 10
    assert explain.rate_per_s is not None and explain.rate_per_s > 0
    assert explain.eta_s == pytest.approx(5 / explain.rate_per_s)


def test_status_of_an_empty_queue(store: Store):
    report = status(store)
    assert report.stages == [] and report.total.total == 0 and report.total.eta_s == 0.0
    assert report.servers == []


def test_status_counts_requests_and_errors_per_llm_server(store: Store):
    old = datetime(2020, 1, 1)
    calls = [("http://a/v1", None, None), ("http://a/v1", "HTTP 503", None)]
    calls += [("http://b/v1", None, None), ("http://b/v1", "connection refused", old)]
    with store.session() as session, session.begin():
        for url, error, created_at in calls:
            call = LlmCall(model="m", base_url=url, error=error)
            if created_at is not None:
                call.created_at = created_at
            session.add(call)
    servers = {server.base_url: server for server in status(store).servers}
    assert list(servers) == ["http://a/v1", "http://b/v1"]
    a, b = servers["http://a/v1"], servers["http://b/v1"]
    assert (a.requests, a.errors, a.recent_requests, a.recent_errors) == (2, 1, 2, 1)
    assert (b.requests, b.errors, b.recent_requests, b.recent_errors) == (2, 1, 1, 0)


def add_corrupt_window(session: Session, latent_id: int) -> None:
    """An example row whose token ids were cut off mid-number: it cannot be decoded."""
    session.add(
        Example(
            latent_id=latent_id,
            cache_version_id=version_for_added_windows(session, latent_id),
            kind="top",
            rank=99,
            token_ids=b"\x01\x02\x03",
            activations=b"\x00\x00\x80\x3f",
            max_activation=1.0,
        )
    )


def test_worker_completes_fails_and_drains(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    """The score loop (`ScoreWorkers`) on real jobs that need no LLM: scorable latents are
    explained and scored; a latent that never fires fails at once (retrying cannot help); one
    whose stored window is corrupt fails on each attempt until `max_attempts` and keeps its
    error; the loop returns once nothing is left to claim."""
    latents = make_run(store, 12)
    planted = plant_small("return", corpus_windows, tokenizer)
    never_fires = latents[0::4]  # only windows where the latent does not fire
    corrupt = [latents[2], latents[7]]
    with store.session() as session, session.begin():
        for latent_id in latents:
            fires = latent_id not in never_fires
            add_planted_windows(
                session, latent_id, [w for w in planted if fires or w.kind == "random"]
            )
            if latent_id in corrupt:
                add_corrupt_window(session, latent_id)
        assert queue_jobs(session, latents, "explain", LLM_FREE_JOB, max_attempts=2) == 12

    # Never contacted: a client to a closed port proves that no request is made.
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    loop = ScoreWorkers(store, llm, home, workers=3, lease_seconds=30, poll_seconds=0.05)
    stats = asyncio.run(loop.run())
    failing = len(never_fires) + len(corrupt)
    assert (stats.completed, stats.failed, stats.lost) == (12 - failing, failing, 0)
    assert stats.requeued == len(corrupt) and stats.requests == 0  # one retry each
    assert job_states(store) == {"done": 12 - failing, "failed": failing}
    with store.read_session() as session:
        jobs = {job.latent_id: job for job in session.scalars(select(Job))}
        explained = Counter(session.scalars(select(Explanation.job_id)))
        scored = Counter(session.scalars(select(Score.job_id)))
    for latent_id in never_fires:
        job = jobs[latent_id]
        assert (job.state, job.attempts) == ("failed", 1)
        assert job.last_error == f"latent {latent_id} has no activating example to explain"
    for latent_id in corrupt:
        job = jobs[latent_id]
        assert (job.state, job.attempts) == ("failed", 2)
        assert job.last_error == "ValueError: buffer size must be a multiple of element size"
    done = {job.id for job in jobs.values() if job.state == "done"}
    assert all(
        job.attempts == 1 and job.last_error is None for job in jobs.values() if job.id in done
    )
    # One token baseline explanation and one embedding score per done job; none for the rest.
    assert explained == scored == Counter(done)


def test_max_jobs_is_never_passed_by_concurrent_slots(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    latents = make_run(store, 6)
    planted = plant_small("return", corpus_windows, tokenizer)
    with store.session() as session, session.begin():
        for latent_id in latents:
            add_planted_windows(session, latent_id, planted)
        assert queue_jobs(session, latents, "explain", LLM_FREE_JOB) == 6
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    loop = ScoreWorkers(store, llm, home, workers=4, max_jobs=3, poll_seconds=0.05)
    stats = asyncio.run(loop.run())
    assert stats.completed == 3
    assert job_states(store) == {"done": 3, "queued": 3}


# --- choosing latents to queue --------------------------------------------------------------


def test_queue_run_all_skips_dead_latents_and_is_idempotent(store: Store):
    latents = make_run(store, 10)
    with store.session() as session, session.begin():
        session.execute(update(Latent).where(Latent.id == latents[0]).values(firing_count=0))
    result = queue_run(store, "r", in_campaign, QueueConfig(selection="all"))
    assert (result.selected, result.inserted) == (19, 19)
    assert queue_run(store, "r", in_campaign).inserted == 0


def test_queue_run_sample_is_seeded(store: Store):
    make_run(store, 50)
    first = queue_run(
        store, "r", in_campaign, QueueConfig(stage="a", selection="sample", latents=10, seed=3)
    )
    again = queue_run(
        store, "r", in_campaign, QueueConfig(stage="b", selection="sample", latents=10, seed=3)
    )
    with store.read_session() as session:
        chosen = {
            stage: set(session.scalars(select(Job.latent_id).where(Job.stage == stage)))
            for stage in ("a", "b")
        }
    assert first.inserted == again.inserted == 10
    assert chosen["a"] == chosen["b"]


def test_queue_run_stratified_takes_equal_shared_and_specific(store: Store):
    make_run(store, 10)
    with store.session() as session, session.begin():
        sae_a, sae_b = session.scalars(select(Sae).order_by(Sae.seed)).all()
        cos = [0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
        store_match_pair(
            session,
            sae_a,
            sae_b,
            partner_decoder=range(10),
            cos_decoder=cos,
            partner_encoder=range(10),
            cos_encoder=cos,
            solver="scipy",
        )
    result = queue_run(
        store, "r", in_campaign, QueueConfig(selection="stratified", latents=5, seed=1)
    )
    assert (result.shared, result.seed_specific, result.inserted) == (3, 3, 6)
    with store.read_session() as session:
        indices = sorted(
            session.scalars(
                select(Latent.index).join(Job, Job.latent_id == Latent.id).where(Latent.index < 3)
            )
        )
    assert indices == [0, 1, 2]


def test_queue_run_stratified_without_matches_is_refused(store: Store):
    make_run(store, 10)
    with pytest.raises(UserError, match="no stored matches"):
        queue_run(store, "r", in_campaign, QueueConfig(selection="stratified", latents=5))
    assert job_states(store) == {}


def test_queue_run_of_a_missing_run_changes_nothing(store: Store):
    make_run(store, 10)
    with pytest.raises(UserError, match="no run named 'ghost'"):
        queue_run(store, "ghost", in_campaign)
    assert job_states(store) == {}
