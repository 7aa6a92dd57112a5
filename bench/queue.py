"""Queue throughput: jobs claimed and completed per second by 1, 4 and 16 worker processes,
on SQLite and on PostgreSQL, printed side by side.

Each worker is a forked process running `service.store.worker.work`: claim a batch, keep its
leases, write one result row per job and complete the job in the same transaction. The jobs
do no work of their own, so this measures the queue's overhead alone. Every cell uses a fresh
store with the same jobs.

    python bench/queue.py [--jobs 2000] [--batch 1] [--workers 1 4 16]
"""

# The sys.path fix below must run before the imports:
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/queue.py`, this folder comes first on sys.path and this file would
# shadow the standard library's `queue`, which multiprocessing imports.
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import argparse
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.engine import open_store, upgrade
from service.store.models import Explanation, Job, Latent
from service.store.queue import Lease, enqueue
from service.store.results import register_run, register_sae
from service.store.scratch import DEFAULT_SERVER, postgres_unreachable, scratch_postgres
from service.store.worker import work

STAGE = "bench"
FORK = multiprocessing.get_context("fork")


def _prepare(url: str, n_jobs: int) -> None:
    upgrade(url)
    store = open_store(url)
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "bench",
            subject_model="none",
            hookpoint="none",
            dataset="none",
            architecture="topk",
            n_latents=n_jobs,
            k=1,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=n_jobs, d_in=1)
        latents = session.scalars(select(Latent.id).where(Latent.sae_id == sae.id)).all()
        enqueue(session, latents, STAGE, {"bench": True})
    store.dispose()


def _write_result(lease: Lease) -> Callable[[Session], None]:
    def write(session: Session) -> None:
        session.add(
            Explanation(
                latent_id=lease.latent_id,
                job_id=lease.job_id,
                explainer="bench",
                model="none",
                config_hash=lease.config_hash,
                text="x",
            )
        )

    return write


def _worker(url: str, batch: int, ready: Event, go: Event) -> None:
    store = open_store(url)
    ready.set()
    go.wait()
    work(store, STAGE, _write_result, batch=batch, lease_seconds=60, poll_seconds=0.05)
    store.dispose()


def measure(url: str, n_jobs: int, n_workers: int, batch: int) -> float:
    """Jobs per second for `n_workers` processes draining `n_jobs` fresh jobs at `url`."""
    _prepare(url, n_jobs)
    go = FORK.Event()
    readies = [FORK.Event() for _ in range(n_workers)]
    processes = [FORK.Process(target=_worker, args=(url, batch, ready, go)) for ready in readies]
    for process in processes:
        process.start()
    for ready in readies:
        ready.wait(60)
    started = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError("a worker failed")
    store = open_store(url)
    with store.read_session() as session:
        done = session.scalar(select(func.count()).where(Job.state == "done"))
        results = session.scalar(select(func.count()).select_from(Explanation))
    store.dispose()
    if done != n_jobs or results != n_jobs:
        raise RuntimeError(f"expected {n_jobs} done jobs and results, got {done} and {results}")
    return n_jobs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1, help="jobs claimed per claim")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--postgres", default=DEFAULT_SERVER, help="server for scratch dbs")
    args = parser.parse_args()

    rates: dict[tuple[str, int], float] = {}
    reason = postgres_unreachable(args.postgres)
    with tempfile.TemporaryDirectory() as folder:
        for n_workers in args.workers:
            url = f"sqlite:///{Path(folder) / f'bench-{n_workers}.db'}"
            rates["sqlite", n_workers] = measure(url, args.jobs, n_workers, args.batch)
            if reason is None:
                with scratch_postgres(args.postgres, prefix="autointerp_bench") as pg_url:
                    pg = pg_url.render_as_string(hide_password=False)
                    rates["postgresql", n_workers] = measure(pg, args.jobs, n_workers, args.batch)

    print(
        f"queue throughput: {args.jobs} jobs, claim batch {args.batch}, "
        f"worker processes, {multiprocessing.cpu_count()} CPU cores"
    )
    if reason is not None:
        print(f"PostgreSQL skipped: {reason}")
    print(f"{'workers':>8} {'SQLite jobs/s':>14} {'PostgreSQL jobs/s':>18} {'PG / SQLite':>12}")
    for n_workers in args.workers:
        sqlite_rate = rates["sqlite", n_workers]
        pg_rate = rates.get(("postgresql", n_workers))
        pg_text = f"{pg_rate:18.0f}" if pg_rate else f"{'-':>18}"
        ratio = f"{pg_rate / sqlite_rate:11.2f}x" if pg_rate else f"{'-':>12}"
        print(f"{n_workers:>8} {sqlite_rate:14.0f} {pg_text} {ratio}")
    base = args.workers[0]
    for backend in ("sqlite", "postgresql"):
        if (backend, base) in rates:
            scaling = ", ".join(
                f"{n}: {rates[backend, n] / rates[backend, base]:.2f}x" for n in args.workers
            )
            print(f"{backend} scaling vs {base} worker(s): {scaling}")


if __name__ == "__main__":
    main()
