"""The latent browser's server time at scale: median and p90 milliseconds per page.

    python -m bench.ui [--latents 131072] [--seeds 2] [--backends sqlite,postgresql]
    python -m bench.ui build URL [--latents N] [--seeds S]   # keep a store to time again
    python -m bench.ui time URL [--requests 30]

The synthetic store: S seeds of N latents matched by random permutations, every latent
explained and scored (own and shuffled, two scorers), firing statistics, and 19 windows per
latent (10 top, 3 x 2 quantile, 3 silent) from the cache bench's generator written through
the cache stage's writer: 2 x 131,072 latents is about
5 million windows. The default run builds it in a temporary SQLite file and a scratch
PostgreSQL database, times each, and deletes both.

Requests go through Starlette's TestClient to the app in this process, so the figures are
the server's time (routing, SQL, templates), not a network's. Each page is asked once to
warm the per-SAE latent table the list pages filter in memory, then timed on `--requests`
different latents or filters.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.engine import make_url

from bench.cache import HOOKPOINT

if TYPE_CHECKING:
    from service.store.engine import Store

SEEDS_DEFAULT = 2


WORDS = ["return", "class", "digits", "quotes", "comma", "import", "while", "print", "tuple"]


def populate(store: Store, n_latents: int, seeds: int) -> None:
    """The run "bench": seeds matched pairwise by random permutations (cosines uniform in
    0.2-1, so about 14% shared), every latent explained and scored by two scorers, own and
    shuffled, in one campaign. Rows go in by bulk inserts; ids are read back per campaign,
    never through a list of 131,072 parameters (PostgreSQL takes at most 65,535)."""
    from sqlalchemy import insert, select

    from bench.cache import register_synthetic_run, store_random_matches
    from service.store.campaigns import CampaignLLM, get_or_create_campaign
    from service.store.models import Explanation, Score
    from service.store.runs import latent_ids, store_latent_stats

    rng = np.random.default_rng(0)
    with store.session() as session, session.begin():
        run, saes = register_synthetic_run(session, "bench", n_latents, seeds)
        store_random_matches(session, saes, n_latents, rng)
        campaign = get_or_create_campaign(
            session,
            {"explainers": ["llm"], "scorers": ["detection", "fuzzing"]},
            CampaignLLM("openai", "m"),
        )
        for sae in saes:
            counts = rng.integers(0, 5000, n_latents)
            store_latent_stats(session, sae, counts, 1_000_000, rng.uniform(0.5, 9, n_latents))
            ids = latent_ids(session, sae)
            session.execute(
                insert(Explanation),
                [
                    {
                        "latent_id": int(ids[i]),
                        "explainer": "llm",
                        "model": "m",
                        "campaign_id": campaign.id,
                        "text": f"the word {WORDS[i % 9]} near {WORDS[(i * 7) % 9]} ({i % 97})",
                    }
                    for i in range(n_latents)
                ],
            )
        explanation_of = dict(
            session.execute(
                select(Explanation.latent_id, Explanation.id).where(
                    Explanation.campaign_id == campaign.id
                )
            ).all()
        )
        for sae in saes:
            ids = latent_ids(session, sae)
            for scorer in ("detection", "fuzzing"):
                for control, low, high in (("own", 0.5, 1.0), ("shuffled", 0.4, 0.6)):
                    values = rng.uniform(low, high, n_latents)
                    session.execute(
                        insert(Score),
                        [
                            {
                                "latent_id": int(ids[i]),
                                "explanation_id": explanation_of[int(ids[i])],
                                "campaign_id": campaign.id,
                                "scorer": scorer,
                                "control": control,
                                "balanced_accuracy": float(values[i]),
                                "n_examples": 20,
                                "n_parsed": 20,
                                "n_failed": 0,
                            }
                            for i in range(n_latents)
                        ],
                    )


def build(url: str, n_latents: int, seeds: int) -> None:
    """Write the synthetic run, with its windows, into the store at `url` (migrated here)."""
    from bench.cache import synthetic_windows
    from sae.latent_stats import CacheConfig
    from sae.subject_model import load_tokenizer
    from service.cache.writer import batch_decoder, write_windows
    from service.config import get_settings
    from service.store.engine import open_store, upgrade
    from service.store.runs import get_run, latent_ids, run_saes
    from service.store.windows import complete_cache_version, start_cache_version

    upgrade(url)
    store = open_store(url)
    started = time.perf_counter()
    populate(store, n_latents, seeds)
    config = CacheConfig(n_top=10, quantile_bins=3, per_quantile_bin=2, negatives=3)
    with store.session() as session, session.begin():
        run = get_run(session, "bench")
        version = start_cache_version(session, run.id, config.model_dump(mode="json"))
        ids = {
            seed: latent_ids(session, session.merge(sae))
            for seed, sae in run_saes(store, "bench")[HOOKPOINT].items()
        }
    decode = batch_decoder(load_tokenizer("smollm2", get_settings().home))
    rows = 0
    for seed, sae_ids in ids.items():
        windows = synthetic_windows(n_latents, config, seed)
        rows += write_windows(store, version.id, sae_ids, windows, decode)
    with store.session() as session, session.begin():
        complete_cache_version(session, session.merge(version))
    store.dispose()
    seconds = time.perf_counter() - started
    print(f"built {seeds} x {n_latents:,} latents, {rows:,} windows in {seconds:.0f} s")


def _figures(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms"


def time_pages(url: str, requests: int) -> dict[str, list[float]]:
    """Seconds per request of each page, after one warm-up request of each."""
    from starlette.testclient import TestClient

    from sae.subject_model import load_tokenizer
    from service.config import UIConfig, get_settings
    from service.ui.app import create_app
    from service.ui.readonly import open_readonly

    store = open_readonly(url)
    home = get_settings().home
    app = create_app(store, UIConfig(), lambda model: load_tokenizer(model, home))
    client = TestClient(app)
    with store.read_session() as session:
        from service.store.models import Sae

        n_latents = int(session.query(Sae.n_latents).limit(1).scalar() or 0)
    rng = np.random.default_rng(2)
    pages: dict[str, Callable[[int], str]] = {
        "latent page": lambda i: f"/runs/bench/latents/{i % 2}/{int(rng.integers(n_latents))}",
        "filtered list": lambda i: (
            f"/runs/bench/latents?seed={i % 2}&status=specific"
            f"&freq_min={rng.uniform(0, 0.004):.4f}&sort=frequency&order=desc"
            f"&page={int(rng.integers(1, 6))}"
        ),
        "list, score range + sort": lambda i: (
            f"/runs/bench/latents?seed={i % 2}&score=llm/detection"
            f"&score_min={rng.uniform(0.5, 0.9):.2f}&sort=score&order=desc"
        ),
        "list, text search": lambda i: (
            f"/runs/bench/latents?q={['return', 'class near', 'digits'][i % 3]}&sort=count"
        ),
        "compare step": lambda i: f"/runs/bench/compare?a=0&b=1&step={int(rng.integers(1000))}",
        "run page": lambda i: "/runs/bench",
    }
    times: dict[str, list[float]] = {}
    started = time.perf_counter()
    for make in pages.values():
        response = client.get(make(0))
        response.raise_for_status()
    print(f"  warm-up (reads each SAE's table once): {time.perf_counter() - started:.1f} s")
    for name, make in pages.items():
        times[name] = []
        for i in range(requests):
            path = make(i)
            start = time.perf_counter()
            response = client.get(path)
            times[name].append(time.perf_counter() - start)
            response.raise_for_status()
    store.dispose()
    return times


def report(backend: str, times: dict[str, list[float]]) -> None:
    for name, values in times.items():
        print(f"  {backend:10s} {name:26s} {_figures(values)}  ({len(values)} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=["all", "build", "time"], default="all")
    parser.add_argument("url", nargs="?")
    parser.add_argument("--latents", type=int, default=131_072)
    parser.add_argument("--seeds", type=int, default=SEEDS_DEFAULT)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    if args.action == "build":
        build(args.url, args.latents, args.seeds)
        return
    if args.action == "time":
        report(make_url(args.url).get_backend_name(), time_pages(args.url, args.requests))
        return
    from tests.scratch_postgres import scratch_postgres

    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-ui-") as folder, ExitStack() as stack:
            if backend == "sqlite":
                url = f"sqlite:///{Path(folder) / 'store.db'}"
            else:
                scratch = stack.enter_context(scratch_postgres(prefix="autointerp_bench"))
                url = scratch.render_as_string(hide_password=False)
            build(url, args.latents, args.seeds)
            report(backend, time_pages(url, args.requests))


if __name__ == "__main__":
    main()
