"""Report cost at scale: seconds to load a run from the store, compute the report, draw its
figures and write the HTML, for S seeds of N latents with every latent scored (own and
shuffled, two scorers), on SQLite. Explanation agreement is timed separately on a sample of
explained latents, since its cost is the embedding model's (texts per second).

    python bench/report.py [--latents 32768] [--seeds 3] [--explained 2000]
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

import argparse
import tempfile
import time

import numpy as np
from sqlalchemy import insert

from service.config import ReportConfig
from service.report import ReportResult, write_html
from service.report.data import load_run_data
from service.report.report import build_report
from service.store.campaigns import CampaignLLM, get_or_create_campaign
from service.store.engine import Store, open_store, upgrade
from service.store.matches import store_match_pair
from service.store.models import Explanation, Score
from service.store.runs import latent_ids, register_run, register_sae

WORDS = ["return", "class", "digits", "quotes", "comma", "import", "while", "print", "tuple"]


def populate(store: Store, n_latents: int, seeds: int, explained: int) -> None:
    rng = np.random.default_rng(0)
    with store.session() as session, session.begin():
        run = register_run(
            session,
            "bench",
            subject_model="smollm2",
            hookpoint="h",
            dataset="embedded",
            architecture="topk",
            n_latents=n_latents,
            k=32,
            seeds=list(range(seeds)),
        )
        saes = [
            register_sae(session, run, seed, n_latents=n_latents, d_in=576) for seed in range(seeds)
        ]
        campaign = get_or_create_campaign(
            session, {"explainers": ["llm"]}, CampaignLLM("openai", "m")
        )
        for a in range(seeds):
            for b in range(a + 1, seeds):
                store_match_pair(
                    session,
                    saes[a],
                    saes[b],
                    partner_decoder=rng.permutation(n_latents),
                    cos_decoder=rng.uniform(0.2, 1.0, n_latents),
                    partner_encoder=rng.permutation(n_latents),
                    cos_encoder=rng.uniform(0.2, 1.0, n_latents),
                    solver="bench",
                )
        for sae in saes:
            ids = latent_ids(session, sae)
            texts = [
                f"the word {WORDS[i % len(WORDS)]} near {WORDS[(i * 7) % len(WORDS)]} ({i % 97})"
                for i in range(n_latents)
            ]
            session.execute(
                insert(Explanation),
                [
                    {
                        "latent_id": int(ids[i]),
                        "explainer": "llm" if i < explained else "token_baseline",
                        "model": "m",
                        "campaign_id": campaign.id,
                        "text": texts[i],
                    }
                    for i in range(n_latents)
                ],
            )
            explanation_ids = dict(
                session.execute(
                    Explanation.__table__.select()
                    .with_only_columns(Explanation.latent_id, Explanation.id)
                    .where(Explanation.latent_id.in_([int(x) for x in ids]))
                ).all()
            )
            rows = []
            for scorer in ("detection", "fuzzing"):
                for control, low, high in (("own", 0.5, 1.0), ("shuffled", 0.4, 0.6)):
                    values = rng.uniform(low, high, n_latents)
                    rows += [
                        {
                            "latent_id": int(ids[i]),
                            "explanation_id": explanation_ids[int(ids[i])],
                            "campaign_id": campaign.id,
                            "scorer": scorer,
                            "control": control,
                            "balanced_accuracy": float(values[i]),
                            "n_examples": 20,
                            "n_parsed": 20,
                            "n_failed": 0,
                        }
                        for i in range(n_latents)
                    ]
            session.execute(insert(Score), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--explained", type=int, default=2000, help="latents per seed the 'llm' explainer explained"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'bench.db'}"
        upgrade(url)
        store = open_store(url)
        started = time.perf_counter()
        populate(store, args.latents, args.seeds, args.explained)
        print(
            f"populate {args.seeds} x {args.latents:,} latents: "
            f"{time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        data = load_run_data(store, "bench")
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        report = build_report(data, ReportConfig())
        report_s = time.perf_counter() - started
        started = time.perf_counter()
        write_html(ReportResult(report, data), Path(folder) / "report.html")
        html_s = time.perf_counter() - started
        scored = args.latents * args.seeds
        print(f"load from store      {load_s:7.1f} s")
        print(
            f"report (no agreement) {report_s:6.1f} s  ({scored / report_s:,.0f} scored latents/s)"
        )
        print(f"figures + HTML       {html_s:7.1f} s")
        from service.scorers.embedder import load_embedder

        started = time.perf_counter()
        embedder = load_embedder()
        load_model_s = time.perf_counter() - started
        started = time.perf_counter()
        build_report(data, ReportConfig(), embedder.embed)
        agreement_s = time.perf_counter() - started - report_s
        print(f"embedding model load {load_model_s:7.1f} s")
        print(
            f"agreement extra      {agreement_s:7.1f} s for {args.explained:,} explained latents "
            f"per seed ({args.seeds} seeds)"
        )
        store.dispose()


if __name__ == "__main__":
    main()
