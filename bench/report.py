"""`autointerp report --html` at study scale: wall time, CPU time and peak RSS of the command in
its own process, on a synthetic run and optionally on the demo's store.

    python bench/report.py [--store URL] [--latents 32768] [--seeds 2] [--scored 2000]
                           [--demo-db URL] [--code PATH]

The synthetic run "bench" (built into --store when that store lacks it, into a temporary
SQLite file without --store): S TopK seeds of N latents with firing statistics, every pair
of seeds matched (random partners and cosines, so about 14% shared at the 0.7 threshold),
the default cache config's 90 windows of 32 tokens per latent (32,768 x 2 seeds: about 5.9
million windows, written by the cache stage's own writer as bench/cache.py does), and
`--scored` latents of the run (spread evenly over the seeds) explained by two explainers
and scored by two scorers, own and shuffled, 20 predictions per score.

--code runs the command on another checkout's code (e.g. a worktree of main) against the
same store, for a before/after comparison; the store is built with this checkout's code.
"""

# The sys.path fix below must run before the imports:
# ruff: noqa: E402
from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/report.py`, this folder comes first on sys.path, and bench/queue.py
# would shadow the standard library's `queue` (which torch imports).
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import argparse
import os
import subprocess
import tempfile
import time

import numpy as np
from sqlalchemy import insert, select

from bench.cache import register_synthetic_run, store_random_matches, synthetic_windows
from service.store.engine import Store, open_store, upgrade

WORDS = ["return", "class", "digits", "quotes", "comma", "import", "while", "print", "tuple"]
EXPLAINERS = ("llm", "token_baseline")
SCORERS = ("detection", "embedding")
PREDICTIONS = 20
RUN = "bench"


def build(store: Store, n_latents: int, seeds: int, scored: int, windows: bool) -> None:
    from sae.latent_stats import CacheConfig
    from sae.subject_model import load_tokenizer
    from service.cache.writer import batch_decoder, write_windows
    from service.config import get_settings
    from service.store.campaigns import CampaignLLM, get_or_create_campaign
    from service.store.models import Explanation, Prediction, Score
    from service.store.runs import latent_ids, store_latent_stats
    from service.store.windows import complete_cache_version, start_cache_version

    rng = np.random.default_rng(0)
    config = CacheConfig()
    with store.session() as session, session.begin():
        run, saes = register_synthetic_run(session, RUN, n_latents, seeds)
        n_tokens = 1_000_000
        for sae in saes:
            counts = rng.zipf(1.5, n_latents).clip(max=n_tokens // 10)
            store_latent_stats(session, sae, counts, n_tokens, rng.exponential(5.0, n_latents))
        store_random_matches(session, saes, n_latents, rng)
        ids = [latent_ids(session, sae) for sae in saes]
        version = start_cache_version(session, run.id, config.model_dump(mode="json"))
        campaign = get_or_create_campaign(
            session,
            {"explainers": list(EXPLAINERS), "scorers": list(SCORERS)},
            CampaignLLM("openai", "m"),
        )
        campaign_id = campaign.id
    started = time.perf_counter()
    decode = batch_decoder(load_tokenizer("smollm2", get_settings().home))
    for seed, sae_ids in enumerate(ids if windows else []):
        write_windows(
            store, version.id, sae_ids, synthetic_windows(n_latents, config, seed), decode
        )
    with store.session() as session, session.begin():
        complete_cache_version(session, session.merge(version))
    print(f"  windows written in {time.perf_counter() - started:.0f} s", flush=True)
    per_seed = [scored // seeds + (seed < scored % seeds) for seed in range(seeds)]
    with store.session() as session, session.begin():
        for seed, sae_ids in enumerate(ids):
            chosen = np.sort(rng.choice(n_latents, per_seed[seed], replace=False))
            for explainer in EXPLAINERS:
                session.execute(
                    insert(Explanation),
                    [
                        {
                            "latent_id": int(sae_ids[i]),
                            "explainer": explainer,
                            "model": "m",
                            "campaign_id": campaign_id,
                            "text": f"the word {WORDS[i % len(WORDS)]} near "
                            f"{WORDS[(i * 7) % len(WORDS)]} ({i % 97}, {explainer})",
                        }
                        for i in chosen.tolist()
                    ],
                )
                explanation_of = dict(
                    session.execute(
                        select(Explanation.latent_id, Explanation.id).where(
                            Explanation.explainer == explainer,
                            Explanation.latent_id.in_([int(sae_ids[i]) for i in chosen]),
                        )
                    ).all()
                )
                latents = [int(sae_ids[i]) for i in chosen]
                for scorer in SCORERS:
                    for control, low, high in (("own", 0.5, 1.0), ("shuffled", 0.4, 0.6)):
                        sources = latents if control == "own" else rng.permutation(latents)
                        values = rng.uniform(low, high, len(latents))
                        metric = "balanced_accuracy" if scorer == "detection" else "auc"
                        score_ids = session.scalars(
                            insert(Score).returning(Score.id, sort_by_parameter_order=True),
                            [
                                {
                                    "latent_id": latent,
                                    "explanation_id": explanation_of[int(source)],
                                    "campaign_id": campaign_id,
                                    "scorer": scorer,
                                    "control": control,
                                    metric: float(value),
                                    "n_examples": PREDICTIONS,
                                    "n_parsed": PREDICTIONS,
                                    "n_failed": 0,
                                }
                                for latent, source, value in zip(
                                    latents, sources, values, strict=True
                                )
                            ],
                        ).all()
                        labels = np.arange(PREDICTIONS) < PREDICTIONS // 2
                        session.execute(
                            insert(Prediction),
                            [
                                {
                                    "score_id": score_id,
                                    "label": bool(label),
                                    "predicted": bool(label) != (rng.random() < 0.2),
                                    "probability": float(rng.random()),
                                }
                                for score_id in score_ids
                                for label in labels
                            ],
                        )


def has_run(store: Store) -> bool:
    from service.store.models import Run

    with store.read_session() as session:
        return session.scalar(select(Run.id).where(Run.name == RUN)) is not None


def time_report(url: str, run: str, code: Path, html: Path) -> dict[str, float]:
    """`autointerp report --run RUN --html HTML` in a child process, on `code`'s checkout:
    its wall time, CPU time (user + system) and peak RSS, from the kernel's accounting."""
    env = {**os.environ, "AUTOINTERP_DB": url, "PYTHONPATH": str(code)}
    command = [
        sys.executable,
        "-c",
        "import sys; from service.cli import main; sys.argv[0] = 'autointerp'; main()",
        "report",
        "--run",
        run,
        "--html",
        str(html),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=code, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"autointerp report failed on {url} (exit {status})")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
    }


def describe_store(url: str, run: str) -> str:
    from sqlalchemy import func

    from service.store.models import Example, Latent, Run, Sae, Score

    store = open_store(url)
    try:
        with store.read_session() as session:
            run_id = session.scalar(select(Run.id).where(Run.name == run))
            of_run = select(Latent.id).join(Sae).where(Sae.run_id == run_id)
            latents = session.scalar(select(func.count()).select_from(of_run.subquery()))
            windows = session.scalar(select(func.count()).select_from(Example))
            scored = session.scalar(
                select(func.count(func.distinct(Score.latent_id))).where(
                    Score.latent_id.in_(of_run)
                )
            )
    finally:
        store.dispose()
    return f"{latents:,} latents, {windows:,} windows, {scored:,} scored latents"


def report_line(label: str, result: dict[str, float]) -> str:
    return (
        f"{label:<34} {result['wall_s']:>7.1f} {result['cpu_s']:>7.1f} {result['peak_mib']:>9,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", help="store URL: reuse its run 'bench', or build it there")
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--scored", type=int, default=2000, help="scored latents in the run")
    parser.add_argument("--demo-db", help="the demo's store URL: time its report too")
    parser.add_argument("--demo-run", default="demo")
    parser.add_argument(
        "--code", type=Path, default=HERE.parent, help="checkout whose code runs the report"
    )
    parser.add_argument(
        "--no-windows", action="store_true", help="build without windows (the report counts them)"
    )
    parser.add_argument("--build-only", action="store_true", help="build the store and stop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        url = args.store or f"sqlite:///{Path(folder) / 'store.db'}"
        upgrade(url)
        store = open_store(url)
        if not has_run(store):
            started = time.perf_counter()
            print(f"building run {RUN!r} in {url}", flush=True)
            build(store, args.latents, args.seeds, args.scored, not args.no_windows)
            print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        store.dispose()
        print(f"synthetic: {describe_store(url, RUN)}")
        if args.build_only:
            return
        print(f"code: {args.code.resolve()}; load: {os.getloadavg()[0]:.2f}")
        print(f"{'autointerp report --html':<34} {'wall s':>7} {'CPU s':>7} {'peak MiB':>9}")
        html = Path(folder) / "report.html"
        print(report_line(f"synthetic {RUN}", time_report(url, RUN, args.code, html)), flush=True)
        if args.demo_db:
            demo = time_report(args.demo_db, args.demo_run, args.code, html)
            print(report_line(f"demo {args.demo_run}", demo))


if __name__ == "__main__":
    main()
