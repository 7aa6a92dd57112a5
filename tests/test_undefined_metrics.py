"""Undefined metrics on real SQLite and PostgreSQL: a latent with no non-firing window (one
that fires in every window) is scored for real, its metric is stored as NULL, not as the one
recall it has, and the report counts it by reason instead of averaging it in."""

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from planted_store import LLM_FREE_JOB, add_planted_windows, one_sae_run, plant_small, queue_jobs
from rich.console import Console
from sqlalchemy import select

from service.config import LLMConfig, ReportConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.report.data import load_run_data
from service.report.html import render_html
from service.report.report import build_report
from service.report.terminal import headline
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store
from service.store.models import Score


def test_a_latent_without_negatives_stores_null_and_the_report_counts_it(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    planted = plant_small("return", corpus_windows, tokenizer)
    with store.session() as session, session.begin():
        whole, always_firing = one_sae_run(session, 2)
        add_planted_windows(session, whole, planted)
        add_planted_windows(session, always_firing, [w for w in planted if w.kind != "random"])
        assert queue_jobs(session, [whole, always_firing], "explain", LLM_FREE_JOB) == 2
    # No LLM takes part: the token baseline explains, MiniLM scores.
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    stats = asyncio.run(ScoreWorkers(store, llm, home, workers=2, poll_seconds=0.05).run())
    assert stats.completed == 2

    with store.read_session() as session:
        scores = {score.latent_id: score for score in session.scalars(select(Score))}
    assert scores[whole].auc is not None and scores[whole].balanced_accuracy is not None
    undefined = scores[always_firing]
    assert (undefined.n_examples, undefined.n_parsed) == (LLM_FREE_JOB["n_positive"],) * 2
    assert undefined.auc is None
    assert undefined.balanced_accuracy is None and undefined.f1 is None

    report = build_report(load_run_data(store, "r"), ReportConfig(n_resamples=100))
    (section,) = report.hookpoints[0].scorers
    assert (section.scorer, section.metric) == ("embedding", "auc")
    assert section.scored.n == 1
    assert section.undefined == {"no negatives": 1}
    console = Console(width=250, record=True)
    for part in headline(report):
        console.print(part)
    assert "no negatives: 1" in console.export_text()
    assert "no negatives: 1" in render_html(report, {})
