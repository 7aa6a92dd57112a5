"""Workers that die: 8 worker processes drain 2,000 jobs while two are SIGKILLed mid-job,
one inside its results transaction and one between jobs while holding leases. Afterwards
every job is done exactly once and the dead workers' jobs were re-run after their leases
expired. Runs on real SQLite and PostgreSQL."""

import multiprocessing
import os
import signal
import time
from multiprocessing.synchronize import Event

from sqlalchemy import func, select

from service.store.engine import Store, open_store
from service.store.models import Explanation, Job, Latent
from service.store.queue import Lease, enqueue
from service.store.results import register_run, register_sae
from service.store.worker import work

N_JOBS = 2000
N_WORKERS = 8
LEASE_SECONDS = 2.0
STAGE = "fault"
# Forked workers start in milliseconds and need nothing pickled.
FORK = multiprocessing.get_context("fork")


def worker_main(url: str, owner: str, freeze_at: str, freeze: Event, frozen: Event) -> None:
    """A worker; a victim stops dead where `freeze_at` says once `freeze` is set, and waits
    there (its lease keeper thread still renewing) to be killed."""
    store = open_store(url)

    def stop_dead() -> None:
        frozen.set()
        time.sleep(3600)

    def process(lease: Lease):
        if freeze_at == "between jobs" and freeze.is_set():
            stop_dead()
        time.sleep(0.001)

        def write(session) -> None:
            session.add(
                Explanation(
                    latent_id=lease.latent_id,
                    job_id=lease.job_id,
                    explainer="fault-test",
                    model=owner,
                    config_hash=lease.config_hash,
                    text=f"attempt {lease.attempt}",
                )
            )
            session.flush()
            if freeze_at == "inside transaction" and freeze.is_set():
                stop_dead()

        return write

    work(store, STAGE, process, owner=owner, batch=4, lease_seconds=LEASE_SECONDS, poll_seconds=0.1)
    store.dispose()


def done_count(store: Store) -> int:
    with store.read_session() as session:
        return int(
            session.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) or 0
        )


def test_killed_workers_lose_nothing_and_duplicate_nothing(store: Store):
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "faults",
            subject_model="m",
            hookpoint="h",
            dataset="d",
            architecture="topk",
            n_latents=N_JOBS,
            k=1,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=N_JOBS, d_in=4)
        latents = session.scalars(select(Latent.id).where(Latent.sae_id == sae.id)).all()
        assert enqueue(session, latents, STAGE, {"k": 1}) == N_JOBS

    url = store.url.render_as_string(hide_password=False)
    roles = {"w0": "inside transaction", "w1": "between jobs"}
    freeze = {owner: FORK.Event() for owner in roles}
    frozen = {owner: FORK.Event() for owner in roles}
    processes = {}
    for index in range(N_WORKERS):
        owner = f"w{index}"
        args = (url, owner, roles.get(owner, ""), freeze.get(owner, FORK.Event()))
        processes[owner] = FORK.Process(
            target=worker_main, args=(*args, frozen.get(owner, FORK.Event()))
        )
    started = time.monotonic()
    for process in processes.values():
        process.start()
    try:
        while done_count(store) < N_JOBS // 5:
            assert time.monotonic() - started < 60, "workers made no progress"
            time.sleep(0.05)
        for owner in roles:
            freeze[owner].set()
        for owner in roles:
            assert frozen[owner].wait(30), f"{owner} never reached its freeze point"
            os.kill(processes[owner].pid or 0, signal.SIGKILL)
            processes[owner].join(10)
            assert processes[owner].exitcode == -signal.SIGKILL

        # What the dead workers held when they died, and until when.
        with store.read_session() as session:
            in_flight = {
                row.id: (row.lease_owner, row.lease_expires_at)
                for row in session.execute(
                    select(Job.id, Job.lease_owner, Job.lease_expires_at).where(
                        Job.state == "leased", Job.lease_owner.in_(roles)
                    )
                )
            }
        for owner in roles:
            assert any(holder == owner for holder, _ in in_flight.values()), owner

        for owner, process in processes.items():
            if owner not in roles:
                process.join(120)
                assert process.exitcode == 0, f"{owner} ended with {process.exitcode}"
    finally:
        for process in processes.values():
            if process.is_alive():
                process.kill()
                process.join()

    with store.read_session() as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        n_results, n_jobs_with_results = session.execute(
            select(func.count(), func.count(func.distinct(Explanation.job_id)))
        ).one()
        rerun = {
            job.id: job for job in session.scalars(select(Job).where(Job.id.in_(list(in_flight))))
        }
        rerun_results = session.execute(
            select(Explanation.job_id, Explanation.model).where(
                Explanation.job_id.in_(list(in_flight))
            )
        ).all()

    assert states == {"done": N_JOBS}
    assert (n_results, n_jobs_with_results) == (N_JOBS, N_JOBS)
    for job_id, (_, expired_at) in in_flight.items():
        job = rerun[job_id]
        assert job.lease_owner not in roles and job.attempts >= 2
        assert job.finished_at is not None and job.finished_at >= expired_at
    assert len(rerun_results) == len(in_flight)
    assert not any(model in roles for _, model in rerun_results)
