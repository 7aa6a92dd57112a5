"""Workers that die, on the real loop: four `autointerp score` processes drain 200 score jobs
that need no LLM (token baseline explanations scored by the embedding scorer, on planted
windows) while two of them are SIGKILLed mid-run, one inside its results transaction and one
while it holds leases, and then started again, as an operator would. Afterwards every job is
done exactly once with exactly one set of results, the dead processes' jobs were re-run by
the living (survivors or the restarted) after their leases expired, the restarted processes
did their share, and nothing the process killed inside its transaction wrote survives. Runs
on real SQLite and PostgreSQL.

A restarted process takes a while to start (importing torch, loading MiniLM) and could find
the queue drained by then. So the survivors are paused (SIGSTOP, never while they hold
SQLite's write lock) until each restarted process has leased a job. Their leases run out
meanwhile and are taken over: a stalled worker's late results must be refused as well.

Catching a process inside its results transaction, with no hook in the product:
- PostgreSQL: the test locks the row of the one job the victim is working on (FOR NO KEY
  UPDATE, as an UPDATE would; the victim runs one slot), so the victim inserts all of that
  job's results (their foreign keys only need KEY SHARE) and then waits in `complete`, its
  transaction open. Each process connects under its own `application_name`, so
  `pg_stat_activity` and `pg_locks` show the victim's backend waiting to update `job` while
  it holds the row locks of its explanation inserts. The victim is killed there, the test's
  lock released, and the backend must roll back and vanish. Other processes are not held up.
- SQLite (WAL) has no such point: BEGIN IMMEDIATE takes the write lock before the
  transaction's first statement, and a writer that holds it never waits. So the test watches
  /proc/locks for the victim holding the WAL write lock (byte 120 of the -shm file), stops
  it there (SIGSTOP), and kills it when the write transaction it is stopped in can only be
  its results transaction: the victim runs one slot, whose job is still leased to it (so it
  is not claiming its next job) and whose lease keeper has not woken since the lease was last
  granted or renewed (so it is not renewing). Otherwise it lets it go on (SIGCONT) and waits
  for its next write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from planted_store import LLM_FREE_JOB, add_planted_windows, plant_small, queue_jobs
from sqlalchemy import Connection, func, select, text
from sqlalchemy.engine import make_url

from service.scoring.planted import RULES
from service.store.engine import Store
from service.store.models import Explanation, Job, LlmCall, Prediction, Score, utcnow
from service.store.runs import latent_ids, register_run, register_sae

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
N_JOBS = 200
STAGE = "faults"
LEASE_SECONDS = 3.0
N_HELD_OUT = LLM_FREE_JOB["n_positive"]  # activating, and as many silent windows, per score
# Explained from activation statistics and scored by MiniLM on the CPU: no LLM anywhere.
# Process name -> slots (`--workers`). The in-transaction victim runs one slot, so the test
# knows which job it writes (PostgreSQL) and which transaction holds the write lock (SQLite).
IN_TRANSACTION, HOLDING_LEASES = "victim-in-transaction", "victim-holding-leases"
PROCESSES = {IN_TRANSACTION: 1, HOLDING_LEASES: 3, "survivor-1": 2, "survivor-2": 2}
# Cold start: four processes importing torch and loading the tokenizer and MiniLM on 2 cores.
START_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 180.0
# On SQLite's WAL index (the -shm file) a writer holds a POSIX write lock on this byte.
WAL_WRITE_LOCK_BYTE = 120

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, message: Callable[[], str]) -> T:
    """Poll `condition` until it returns something truthy; fail with `message` on timeout."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f} s: {message()}")
        time.sleep(0.05)
    return value


@dataclass
class Worker:
    """One `autointerp score` process, its output in `log`."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def owns(self, owner: str | None) -> bool:
        # Lease owners are host:pid:random (`new_worker_id`), the pid the console script's.
        return owner is not None and f":{self.pid}:" in owner

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.process.wait(30) == -signal.SIGKILL, f"{self.name} outlived SIGKILL"


def start_worker(
    name: str,
    slots: int,
    url: str,
    home: Path,
    folder: Path,
    stage: str = STAGE,
    lease_seconds: float = LEASE_SECONDS,
    options: tuple[str, ...] = (),
) -> Worker:
    """`autointerp score` on `url`'s `stage` with `slots` slots, and `options` added."""
    if make_url(url).get_backend_name() == "postgresql":
        # Names the process's backends in pg_stat_activity.
        url = make_url(url).update_query_dict({"application_name": name})
        url = url.render_as_string(hide_password=False)
    env = os.environ | {
        "AUTOINTERP_DB": url,
        "AUTOINTERP_HOME": str(home),
        # Slots embed in threads; torch's own threads on top would only fight over 2 cores.
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [AUTOINTERP, "score", "--stage", stage, "--workers", str(slots)]
    command += ["--lease-seconds", str(lease_seconds), *options]
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Worker(name, process, log)


@pytest.fixture
def workers() -> Iterator[dict[str, Worker]]:
    """The processes a test starts; whatever still runs at its end is killed."""
    started: dict[str, Worker] = {}
    yield started
    for worker in started.values():
        if worker.process.poll() is None:
            worker.process.kill()  # SIGKILL ends a stopped process too
            worker.process.wait(30)


def queue_planted_jobs(store: Store, tokenizer: Any, corpus_windows: np.ndarray) -> list[int]:
    """One SAE of N_JOBS planted latents with 20 windows each, one score job per latent.
    Latent i gets the windows of rule i mod 5 (planting is the slow part, so five sets)."""
    planted = [
        plant_small(rule, corpus_windows, tokenizer, seed=seed) for seed, rule in enumerate(RULES)
    ]
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "faults",
            subject_model="smollm2",
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=N_JOBS,
            k=8,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=N_JOBS, d_in=576)
        ids = [int(latent_id) for latent_id in latent_ids(session, sae)]
        for index, latent_id in enumerate(ids):
            add_planted_windows(session, latent_id, planted[index % len(planted)])
        assert queue_jobs(session, ids, STAGE, LLM_FREE_JOB) == N_JOBS
    return ids


def done_count(store: Store) -> int:
    with store.read_session() as session:
        count = session.scalar(select(func.count()).select_from(Job).where(Job.state == "done"))
    return int(count or 0)


def leases_of(store: Store, worker: Worker) -> dict[int, datetime]:
    """The jobs leased to `worker` as committed, with their lease's expiry."""
    with store.read_session() as session:
        rows = session.execute(
            select(Job.id, Job.lease_expires_at).where(
                Job.state == "leased", Job.lease_owner.like(f"%:{worker.pid}:%")
            )
        ).all()
    return {job_id: expires_at for job_id, expires_at in rows}


# --- PostgreSQL: the victim waits on the test's row lock to complete its job ----------------


def waiting_to_complete(store: Store, application_name: str) -> Any:
    """The backend of `application_name` that has inserted explanations in its open
    transaction (only results transactions do) and now waits on a lock to update a job: its
    `complete`. None if there is none. A new session each time: pg_stat_activity is read once
    per transaction."""
    with store.read_session() as session:
        return session.execute(
            text(
                "SELECT a.pid, a.xact_start FROM pg_stat_activity a "
                "WHERE a.datname = current_database() AND a.application_name = :name "
                "AND a.wait_event_type = 'Lock' AND a.xact_start IS NOT NULL "
                "AND a.query LIKE 'UPDATE job %' AND EXISTS ("
                " SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " WHERE l.pid = a.pid AND l.granted AND c.relname = 'explanation'"
                " AND l.mode = 'RowExclusiveLock')"
            ),
            {"name": application_name},
        ).first()


def backend_alive(store: Store, pid: int) -> bool:
    with store.read_session() as session:
        query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        return bool(session.scalar(query, {"pid": pid}))


def lock_current_job(store: Store, victim: Worker, lock: Connection) -> bool:
    """Lock the row of the one job leased to `victim` in `lock`'s transaction, as an UPDATE
    would: its `complete` then waits for the test, while the foreign keys of the results it
    inserts before (KEY SHARE) do not. False if it holds no job or the row is busy."""
    with store.read_session() as session:
        leased = session.execute(
            select(Job.id, Job.lease_owner, Job.attempts).where(
                Job.state == "leased", Job.lease_owner.like(f"%:{victim.pid}:%")
            )
        ).all()
    if len(leased) != 1:
        return False
    row = lock.execute(
        text(
            "SELECT id FROM job WHERE id = :id AND state = 'leased' AND lease_owner = :owner "
            "AND attempts = :attempts FOR NO KEY UPDATE SKIP LOCKED"
        ),
        {"id": leased[0].id, "owner": leased[0].lease_owner, "attempts": leased[0].attempts},
    ).first()
    if row is None:
        lock.rollback()
    return row is not None


def kill_inside_results_transaction_postgresql(store: Store, victim: Worker) -> None:
    with store.engine.connect() as lock:
        wait_for(
            lambda: lock_current_job(store, victim, lock),
            60,
            lambda: f"{victim.name} held no job to lock\n{victim.tail()}",
        )
        backend = wait_for(
            lambda: waiting_to_complete(store, victim.name),
            60,
            lambda: f"{victim.name} never waited to complete its job\n{victim.tail()}",
        )
        victim.kill()
        # Dead, its backend still waits in the transaction that holds its results.
        assert waiting_to_complete(store, victim.name) == backend
        lock.rollback()
    # Let go, the backend finds its client gone and rolls the results back.
    wait_for(
        lambda: not backend_alive(store, backend.pid),
        60,
        lambda: f"the backend of dead {victim.name} lingers",
    )


# --- SQLite: the victim is stopped while it holds the WAL write lock ------------------------


def holds_wal_write_lock(pid: int, shm_inode: int) -> bool:
    """Whether process `pid` holds the write lock of the WAL index with inode `shm_inode`.
    /proc/locks lines read `1: POSIX  ADVISORY  WRITE 1234 fe:00:5678 120 120`."""
    with open("/proc/locks") as locks:
        for line in locks:
            fields = line.split()
            if (
                len(fields) == 8
                and fields[3] == "WRITE"
                and fields[4] == str(pid)
                and fields[5].rsplit(":", 1)[-1] == str(shm_inode)
                and fields[6] == str(WAL_WRITE_LOCK_BYTE)
            ):
                return True
    return False


def stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (state T)."""
    tasks = Path(f"/proc/{pid}/task")
    return all(
        (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir()
    )


def results_transaction_job(store: Store, victim: Worker, stopped_at: datetime) -> int | None:
    """The job whose results transaction the stopped victim, holding the write lock, must be
    in; None when it may be in another write transaction. Its one slot's write transactions
    are the claim of a job, then the results of that job; its lease keeper's, renewals, each
    started a third of the lease after the previous grant (claim or renewal) returned."""
    leases = leases_of(store, victim)
    if len(leases) != 1:
        return None  # claiming a job: its previous one is done, the new one not yet leased
    ((job_id, expires_at),) = leases.items()
    granted = expires_at - timedelta(seconds=LEASE_SECONDS)
    next_renewal = granted + timedelta(seconds=LEASE_SECONDS / 3)
    if stopped_at >= next_renewal - timedelta(seconds=0.05):
        return None  # its lease keeper may be renewing
    return job_id


def pause(worker: Worker, shm: Path | None) -> None:
    """SIGSTOP `worker`, at a moment it does not hold the write lock of the WAL index `shm`
    (SQLite; None on PostgreSQL, where a stopped session's row locks are skipped by claims)."""
    while True:
        os.kill(worker.pid, signal.SIGSTOP)
        wait_for(lambda: stopped(worker.pid), 10, lambda: f"{worker.name} did not stop")
        if shm is None or not holds_wal_write_lock(worker.pid, shm.stat().st_ino):
            return
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(0.01)


def kill_inside_results_transaction_sqlite(store: Store, victim: Worker, shm: Path) -> None:
    stops = 0
    deadline = time.monotonic() + 90
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{victim.name} never stopped inside its results transaction "
                f"({stops} stops holding the write lock)\n{victim.tail()}"
            )
        assert victim.process.poll() is None, f"{victim.name} ended\n{victim.tail()}"
        inode = shm.stat().st_ino
        if not holds_wal_write_lock(victim.pid, inode):
            continue  # busy: a write transaction lasts milliseconds
        os.kill(victim.pid, signal.SIGSTOP)
        wait_for(lambda: stopped(victim.pid), 10, lambda: f"{victim.name} did not stop")
        stopped_at = utcnow()
        stops += 1
        if (
            holds_wal_write_lock(victim.pid, inode)
            and results_transaction_job(store, victim, stopped_at) is not None
        ):
            victim.kill()
            return
        os.kill(victim.pid, signal.SIGCONT)


def test_killed_workers_lose_nothing_and_duplicate_nothing(
    store: Store,
    home: Path,
    tokenizer: Any,
    corpus_windows: np.ndarray,
    tmp_path: Path,
    workers: dict[str, Worker],
):
    queue_planted_jobs(store, tokenizer, corpus_windows)
    url = store.url.render_as_string(hide_password=False)
    for name, slots in PROCESSES.items():
        workers[name] = start_worker(name, slots, url, home, tmp_path)
    started = time.monotonic()

    def logs() -> str:
        return "\n".join(f"--- {worker.name}\n{worker.tail()}" for worker in workers.values())

    # Mid-run: every process has leased jobs, and a tenth of the queue is done.
    for worker in workers.values():
        wait_for(
            lambda worker=worker: leases_of(store, worker) or worker.process.poll() is not None,
            START_TIMEOUT_S,
            lambda worker=worker: f"{worker.name} never leased a job\n{logs()}",
        )
    wait_for(
        lambda: done_count(store) >= N_JOBS // 10,
        START_TIMEOUT_S,
        lambda: f"{done_count(store)} jobs done\n{logs()}",
    )
    assert all(worker.process.poll() is None for worker in workers.values()), logs()

    # Killed inside its results transaction.
    victim = workers[IN_TRANSACTION]
    shm = None
    if store.backend == "postgresql":
        kill_inside_results_transaction_postgresql(store, victim)
    else:
        database = make_url(url).database
        assert database is not None
        shm = Path(f"{database}-shm")
        kill_inside_results_transaction_sqlite(store, victim, shm)
    in_flight = {IN_TRANSACTION: leases_of(store, victim)}
    assert len(in_flight[IN_TRANSACTION]) == 1, "its one slot was writing its one job"

    # Killed while it holds leases: its slots are between or inside jobs.
    victim = workers[HOLDING_LEASES]
    wait_for(
        lambda: len(leases_of(store, victim)) >= 2,
        60,
        lambda: f"{victim.name} never held two leases\n{victim.tail()}",
    )
    victim.kill()
    in_flight[HOLDING_LEASES] = leases_of(store, victim)
    assert in_flight[HOLDING_LEASES], f"{victim.name} held no lease when it died"
    done_at_kills = done_count(store)
    assert done_at_kills < N_JOBS - 20, "the kills came too late to be mid-run"

    # Both started again: new processes (new worker ids) on the same store, same slots; the
    # survivors wait until each has leased a job.
    living = [worker for worker in workers.values() if worker.name not in in_flight]
    for worker in living:
        pause(worker, shm)
    restarted = [
        start_worker(f"{name}-restarted", PROCESSES[name], url, home, tmp_path)
        for name in in_flight
    ]
    workers.update((worker.name, worker) for worker in restarted)
    try:
        for worker in restarted:
            wait_for(
                lambda worker=worker: leases_of(store, worker) or worker.process.poll() is not None,
                START_TIMEOUT_S,
                lambda worker=worker: f"{worker.name} never leased a job\n{logs()}",
            )
    finally:
        for worker in living:
            os.kill(worker.pid, signal.SIGCONT)
    living += restarted
    for worker in living:
        try:
            code = worker.process.wait(DRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the living did not drain the queue\n{logs()}") from None
        assert code == 0, f"{worker.name} ended with {code}\n{worker.tail()}"
    elapsed = time.monotonic() - started

    with store.read_session() as session:
        jobs = {job.id: job for job in session.scalars(select(Job))}
        explanations = session.execute(
            select(Explanation.job_id, Explanation.latent_id, Explanation.created_at)
        ).all()
        scores = session.execute(select(Score.job_id, Score.created_at, Score.n_examples)).all()
        n_predictions = session.scalar(select(func.count()).select_from(Prediction))
        n_calls = session.scalar(select(func.count()).select_from(LlmCall))
        if store.backend == "sqlite":
            assert session.scalar(text("PRAGMA integrity_check")) == "ok"

    # Every job done, exactly once: one explanation and one score per job (one explainer, one
    # scorer, no controls), each with its verdicts, all written by the job's final attempt.
    assert Counter(job.state for job in jobs.values()) == {"done": N_JOBS}, elapsed
    assert sorted(job_id for job_id, _, _ in explanations) == sorted(jobs)
    assert sorted(job_id for job_id, _, _ in scores) == sorted(jobs)
    assert {n for _, _, n in scores} == {2 * N_HELD_OUT}
    assert n_predictions == N_JOBS * 2 * N_HELD_OUT and n_calls == 0
    for job_id, latent_id, created_at in explanations:
        job = jobs[job_id]
        assert latent_id == job.latent_id
        assert job.finished_at is not None and created_at <= job.finished_at

    # What the dead held was re-run by the living once the dead lease ran out; the results of
    # the transaction killed half-way are not there, those of the re-run are.
    written = [(job_id, at) for job_id, _, at in explanations]
    written += [(job_id, at) for job_id, at, _ in scores]
    for name, held in in_flight.items():
        for job_id, expired_at in held.items():
            job = jobs[job_id]
            assert job.attempts >= 2, (name, job_id)
            assert any(worker.owns(job.lease_owner) for worker in living), (name, job_id)
            assert job.finished_at is not None and job.finished_at >= expired_at, (name, job_id)
            assert all(at >= expired_at for other, at in written if other == job_id), job_id
    # Every job was finished by one of the processes, and each restarted one finished some.
    done_by = {
        worker.name: sum(worker.owns(job.lease_owner) for job in jobs.values())
        for worker in workers.values()
    }
    assert sum(done_by.values()) == N_JOBS, done_by
    assert all(done_by[worker.name] > 0 for worker in restarted), done_by
    print(
        f"{store.backend}: {N_JOBS} jobs in {elapsed:.1f} s, {done_at_kills} done at the kills, "
        f"re-run: {sum(len(held) for held in in_flight.values())}, done by: {done_by}"
    )
