"""Throughput of the real score loop: latents per second that 1, 4 and 16 worker processes,
each running `score_queue` (the loop `autointerp score` runs), explain and score from one
shared store, on SQLite and on PostgreSQL, printed side by side; and, given two or more LLM
servers, the share of the requests each one served.

The queue jobs need no LLM: the token baseline explains each planted latent (windows of the
embedded corpus, `service.scoring.planted`) from its activation statistics and the
embedding scorer ranks its held-out windows with MiniLM on the CPU. So every job goes the
whole way through the loop (claim, lease keeper, windows loaded from the store and
detokenized, explanation, scoring, every result written with the job's completion in one
transaction) with no LLM latency in it. The figure is latents/s scored by the real loop: it
includes MiniLM's compute and the detokenizing, so it is a lower bound on what the queue
itself sustains, not its overhead alone; with an LLM in the loop the LLM sets the pace.

Every cell uses a fresh store holding the same jobs. The processes are forked from a clean
fork server that has imported the loop, load MiniLM before the clock starts (the loop loads
the subject tokenizer on its first job, as `autointerp score` does), and start together; the
clock runs in the store's time from the start to the last job's completion, so the loop's
2-second idle polling at the end does not count.

    python -m bench.queue [--jobs 200] [--slots 1] [--workers 1 4 16] [--threads 1]
                          [--held-out 10]

MiniLM embedding the held-out windows is most of a job's CPU time; a smaller --held-out
shows more of the loop's own cost.

With `--urls URL URL ...` it measures the fleet instead: `--llm-processes` processes score
`--llm-jobs` jobs whose detection scorer asks the LLM one window per request, every process
sending to all the URLs (as `autointerp score --urls A --urls B` does), on PostgreSQL when
it answers (else SQLite); it prints each server's requests and share, from `llm_call`.

    python -m bench.queue --urls http://127.0.0.1:8011/v1 http://127.0.0.1:8012/v1
"""

# The sys.path fix below must run before the imports:
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/queue.py`, this folder comes first on sys.path and this file would
# shadow the standard library's `queue`, which multiprocessing imports; the repository root,
# where tests/ lies, would be missing.
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import argparse
import asyncio
import multiprocessing
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.synchronize import Event

from sqlalchemy import func, select

from sae.data import load_chunks
from sae.subject_model import load_tokenizer
from service.config import LLMConfig, ScoreConfig, ScoringConfig, get_settings
from service.llm.openai_client import OpenAIClient
from service.scorers.embedder import load_embedder
from service.scoring.campaign import open_campaign
from service.scoring.planted import RULES, PlantedWindow, plant
from service.scoring.worker import score_queue
from service.store.engine import open_store, store_now, upgrade
from service.store.models import Explanation, Job, LlmCall, Score
from service.store.queue import enqueue
from service.store.runs import latent_ids, register_run, register_sae
from tests.planted_store import add_planted_windows
from tests.scratch_postgres import DEFAULT_SERVER, postgres_unreachable, scratch_postgres

STAGE = "bench"


def job_config(held_out: int) -> ScoreConfig:
    """Explained from activation statistics, scored by MiniLM on `held_out` activating and as
    many non-activating windows: the LLM is never asked."""
    return ScoreConfig(
        explainers=["token_baseline"],
        scorers=["embedding"],
        shuffled_control=False,
        cross_seed=0,
        n_positive=held_out,
        n_negative=held_out,
    )


def fleet_job_config() -> ScoreConfig:
    """Explained from activation statistics, scored by the detection scorer asking the LLM
    about one window per request: many short requests, so the share per server shows."""
    return ScoreConfig(
        explainers=["token_baseline"],
        scorers=["detection"],
        shuffled_control=False,
        cross_seed=0,
        n_positive=4,
        n_negative=4,
        examples_per_request=1,
    )


# Processes forked from a server that has imported these, not from this process (which has
# loaded a tokenizer and run torch): quick to start, and no inherited thread pools.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["service.scoring.worker", "service.scorers.embedder"])


def planted_windows(home: Path) -> list[list[PlantedWindow]]:
    """One set of windows per planted rule, as the latent cache would store them."""
    tokenizer = load_tokenizer("smollm2", home)
    windows = load_chunks("embedded", tokenizer, chunk_len=32, max_tokens=60_000).numpy()
    return [plant(RULES[rule], windows, tokenizer, seed=seed) for seed, rule in enumerate(RULES)]


def _prepare(url: str, job: ScoreConfig, n_jobs: int, planted: list[list[PlantedWindow]]) -> None:
    """A fresh store: one SAE whose latent i has the windows of rule i mod 5, each queued."""
    upgrade(url)
    store = open_store(url)
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "bench",
            subject_model="smollm2",
            hookpoint="model.layers.6.mlp",
            dataset="embedded",
            architecture="topk",
            n_latents=n_jobs,
            k=8,
            seeds=[0],
        )
        sae = register_sae(session, run, 0, n_latents=n_jobs, d_in=576)
        for index, latent_id in enumerate(latent_ids(session, sae).tolist()):
            add_planted_windows(session, int(latent_id), planted[index % len(planted)])
        campaign = open_campaign(session, job, LLMConfig())
        enqueue(session, latent_ids(session, sae).tolist(), STAGE, campaign.id)
    store.dispose()


def _worker(
    url: str,
    home: Path,
    slots: int,
    threads: int,
    llm_urls: list[str],
    ready: Event,
    go: Event,
) -> None:
    import torch

    torch.set_num_threads(threads)
    store = open_store(url)
    load_embedder(ScoreConfig().embedding_model).embed(["warm up"])
    # Without URLs never contacted: no job asks an LLM.
    llm = OpenAIClient(LLMConfig(urls=llm_urls) if llm_urls else LLMConfig())
    config = ScoringConfig(workers=slots, stage=STAGE, lease_seconds=60.0)
    ready.set()
    go.wait()
    asyncio.run(score_queue(store, llm, home, config, show_progress=False))
    store.dispose()


def measure(
    url: str,
    home: Path,
    planted: list[list[PlantedWindow]],
    args: argparse.Namespace,
    n_workers: int,
    job: ScoreConfig,
    n_jobs: int,
    llm_urls: Sequence[str] = (),
) -> float:
    """Latents per second that `n_workers` processes score from `n_jobs` fresh `job`s."""
    _prepare(url, job, n_jobs, planted)
    go = FORKSERVER.Event()
    readies = [FORKSERVER.Event() for _ in range(n_workers)]
    worker_args = (url, home, args.slots, args.threads, list(llm_urls))
    processes = [
        FORKSERVER.Process(target=_worker, args=(*worker_args, ready, go)) for ready in readies
    ]
    for process in processes:
        process.start()
    for ready in readies:
        if not ready.wait(300):
            raise RuntimeError("a worker did not start")
    store = open_store(url)
    with store.read_session() as session:
        started = store_now(session)
    go.set()
    for process in processes:
        process.join()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError("a worker failed")
    with store.read_session() as session:
        done, finished = session.execute(
            select(func.count(), func.max(Job.finished_at)).where(Job.state == "done")
        ).one()
        explained = session.scalar(select(func.count(func.distinct(Explanation.job_id))))
        scored = session.scalar(select(func.count(func.distinct(Score.job_id))))
        explanations = session.scalar(select(func.count()).select_from(Explanation))
    store.dispose()
    if finished is None or not done == explained == scored == explanations == n_jobs:
        raise RuntimeError(
            f"expected {n_jobs} jobs done, explained and scored once each; got {done} done, "
            f"{explanations} explanations of {explained} jobs, {scored} jobs scored"
        )
    return float(n_jobs / (finished - started).total_seconds())


@contextmanager
def fleet_store(postgres: str, folder: str) -> Iterator[str]:
    """A scratch PostgreSQL database, as a fleet would share; SQLite when none answers."""
    if postgres_unreachable(postgres) is not None:
        yield f"sqlite:///{Path(folder) / 'fleet.db'}"
        return
    with scratch_postgres(postgres, prefix="autointerp_bench") as url:
        yield url.render_as_string(hide_password=False)


def measure_fleet(home: Path, planted: list[list[PlantedWindow]], args: argparse.Namespace) -> None:
    """Jobs/s of `--llm-processes` processes sending to every URL, and each URL's share."""
    with tempfile.TemporaryDirectory() as folder, fleet_store(args.postgres, folder) as url:
        rate = measure(
            url,
            home,
            planted,
            args,
            args.llm_processes,
            fleet_job_config(),
            args.llm_jobs,
            args.urls,
        )
        store = open_store(url)
        with store.read_session() as session:
            rows = session.execute(
                select(LlmCall.base_url, func.count(), func.count(LlmCall.error)).group_by(
                    LlmCall.base_url
                )
            ).all()
        store.dispose()
    backend = url.split(":", 1)[0].split("+", 1)[0]
    print(
        f"real score loop on {backend}, {args.llm_processes} processes x {args.slots} slots, "
        f"{args.llm_jobs} jobs of one detection request per window (4+4 windows), "
        f"{len(args.urls)} LLM servers, {multiprocessing.cpu_count()} CPU cores: "
        f"{rate:.2f} latents/s"
    )
    total = sum(requests for _, requests, _ in rows)
    print(f"{'LLM server':<40} {'requests':>9} {'errors':>7} {'share':>7}")
    for base_url, requests, errors in sorted(rows):
        print(f"{base_url:<40} {requests:>9} {errors:>7} {requests / total:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="latents to score per cell")
    parser.add_argument("--slots", type=int, default=1, help="latents in flight per process")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--held-out", type=int, default=10, help="activating and non-activating windows scored"
    )
    parser.add_argument("--postgres", default=DEFAULT_SERVER, help="server for scratch dbs")
    parser.add_argument(
        "--urls", nargs="+", default=[], help="LLM servers: measure the fleet's shares instead"
    )
    parser.add_argument("--llm-processes", type=int, default=2, help="processes (fleet)")
    parser.add_argument("--llm-jobs", type=int, default=16, help="latents to score (fleet)")
    args = parser.parse_args()

    # The corpus is tokenized here; nothing is forked from this process, but say so anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    home = get_settings().home
    planted = planted_windows(home)
    if args.urls:
        measure_fleet(home, planted, args)
        return
    job = job_config(args.held_out)
    rates: dict[tuple[str, int], float] = {}
    reason = postgres_unreachable(args.postgres)
    with tempfile.TemporaryDirectory() as folder:
        for n_workers in args.workers:
            url = f"sqlite:///{Path(folder) / f'bench-{n_workers}.db'}"
            rates["sqlite", n_workers] = measure(
                url, home, planted, args, n_workers, job, args.jobs
            )
            if reason is None:
                with scratch_postgres(args.postgres, prefix="autointerp_bench") as pg_url:
                    pg = pg_url.render_as_string(hide_password=False)
                    rates["postgresql", n_workers] = measure(
                        pg, home, planted, args, n_workers, job, args.jobs
                    )
    print(
        f"real score loop: {args.jobs} LLM-free jobs (token baseline + embedding scorer, "
        f"{args.held_out}+{args.held_out} held-out windows), {args.slots} slots and "
        f"{args.threads} torch thread(s) per process, {multiprocessing.cpu_count()} CPU cores"
    )
    if reason is not None:
        print(f"PostgreSQL skipped: {reason}")
    header = ("processes", "SQLite latents/s", "PostgreSQL latents/s", "PG / SQLite")
    print(f"{header[0]:>9} {header[1]:>17} {header[2]:>21} {header[3]:>12}")
    for n_workers in args.workers:
        sqlite_rate = rates["sqlite", n_workers]
        pg_rate = rates.get(("postgresql", n_workers))
        pg_text = f"{pg_rate:21.1f}" if pg_rate else f"{'-':>21}"
        ratio = f"{pg_rate / sqlite_rate:11.2f}x" if pg_rate else f"{'-':>12}"
        print(f"{n_workers:>9} {sqlite_rate:17.1f} {pg_text} {ratio}")
    base = args.workers[0]
    for backend in ("sqlite", "postgresql"):
        if (backend, base) in rates:
            scaling = ", ".join(
                f"{n}: {rates[backend, n] / rates[backend, base]:.2f}x" for n in args.workers
            )
            print(f"{backend} scaling vs {base} process(es): {scaling}")


if __name__ == "__main__":
    main()
