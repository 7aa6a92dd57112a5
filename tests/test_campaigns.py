"""Scoring campaigns on real SQLite and PostgreSQL: the config and the LLM a result came from
are one row that every job, explanation, score and call names; readers never mix two; the
same latents under the same campaign are queued once; a campaign's explanation of a latent
is made once and reused; results stored before campaigns are kept and labelled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import LLM_FREE_JOB, one_sae_run, queue_jobs, store_planted_run
from report_fixtures import explanation_text, populate
from sqlalchemy import MetaData, func, insert, select
from test_cache_versions import downgrade_store
from test_store_cli import cli, one_line_error, seed_run

from sae.subject_model import load_tokenizer
from service.config import LLMConfig, ScoreConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.report import make_report
from service.report.show import show_latent
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store, open_store, upgrade
from service.store.models import Campaign, Explanation, Job, LlmCall, Score


def test_a_report_reads_one_campaign_and_names_it(store: Store, home: Path):
    study = populate(store)
    result = make_report(store, study.run)
    assert result.report.campaign is not None
    assert result.report.campaign.startswith(f"campaign {study.campaign_id} ")
    detection = result.data.find_scores("llm", "detection", "own")
    assert detection is not None
    # The other campaign's 0.99 never shows, nor the superseded 0.1 of this one.
    values = detection.value[np.isfinite(detection.value)]
    assert values.size and not np.isclose(values, 0.99).any() and not (values == 0.1).any()
    assert "stale explanation" not in result.data.explanations["llm"].values()

    with store.read_session() as session:
        old = session.scalar(select(Campaign.id).where(Campaign.id != study.campaign_id))
    older = make_report(store, study.run, campaign=old)
    assert older.report.campaign is not None and older.report.campaign.startswith(
        f"campaign {old} "
    )
    for scorer in ("detection", "fuzzing"):
        old_scores = older.data.find_scores("llm", scorer, "own")
        assert old_scores is not None
        assert np.allclose(old_scores.value[np.isfinite(old_scores.value)], 0.99)
    assert older.data.find_scores("llm", "detection", "shuffled") is None
    assert set(older.data.explanations["llm"].values()) == {"stale explanation"}

    # Side by side, paired by latent: both campaigns scored latents 0-35 of every seed.
    both = make_report(store, study.run, campaign=study.campaign_id, compare=old)
    assert both.report.comparison is not None
    rows = {(r.scorer, r.group): r for r in both.report.comparison.rows}
    assert {scorer for scorer, _ in rows} == {"detection", "fuzzing"}
    assert [rows[("detection", g)].n for g in ("all", "shared", "seed-specific")] == [108, 60, 48]
    first = np.concatenate([study.own[("llm", "detection")][seed] for seed in (0, 1, 2)])
    detection = rows[("detection", "all")]
    assert detection.mean_second == pytest.approx(0.99)
    assert detection.mean_first == pytest.approx(np.nanmean(first))
    assert detection.difference.mean == pytest.approx(0.99 - np.nanmean(first))
    assert detection.wilcoxon_p is not None and detection.wilcoxon_p < 1e-6

    tokenizer = lambda _model: load_tokenizer("smollm2", home)  # noqa: E731
    view = show_latent(store, f"{study.run}:0", 3, tokenizer, n_contexts=0)
    assert view.explanations == {"llm": explanation_text(0, 3)}
    assert {line.score.campaign_id for line in view.scores} == {study.campaign_id}
    assert view.campaign is not None and view.campaign.startswith(f"campaign {study.campaign_id}")
    old_view = show_latent(store, f"{study.run}:0", 3, tokenizer, n_contexts=0, campaign_id=old)
    assert old_view.explanations == {"llm": "stale explanation"}
    assert [line.score.balanced_accuracy for line in old_view.scores] == [0.99, 0.99]


def test_queue_stores_the_resolved_config_once_per_campaign(store_url: str, tmp_path: Path):
    upgrade(store_url)
    seed_run(store_url, n_latents=10)
    config_file = tmp_path / "score.toml"
    config_file.write_text('explainers = ["token_baseline"]\nscorers = ["embedding"]\nseed = 4\n')
    first = cli(store_url, "queue", "--run", "demo", "--config", str(config_file))
    assert first.returncode == 0, first.stderr
    assert "20 new explain jobs" in first.stdout and "campaign 1" in first.stdout
    # The same config from the flags instead of the file: the same campaign, nothing new.
    again = cli(
        store_url,
        "queue",
        "--run",
        "demo",
        "--explainers",
        "token_baseline",
        "--scorers",
        "embedding",
        "--config",
        str(config_file),
    )
    assert "0 new explain jobs, 20 already queued" in again.stdout, again.stdout
    # The default config with two LLMs: two campaigns, both with all latents.
    for model in ("smollm2", "another-model"):
        result = cli(store_url, "queue", "--run", "demo", "--model", model)
        assert "20 new explain jobs" in result.stdout, result.stdout + result.stderr
    store = open_store(store_url)
    with store.read_session() as session:
        campaigns = session.scalars(select(Campaign).order_by(Campaign.id)).all()
        assert [c.llm_model for c in campaigns] == [None, "smollm2", "another-model"]
        assert campaigns[0].config == ScoreConfig(
            explainers=["token_baseline"], scorers=["embedding"], seed=4
        ).model_dump(mode="json")
        assert session.scalar(select(func.count()).select_from(Job)) == 60
    store.dispose()
    listing = cli(store_url, "campaigns")
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "another-model" in line]
    assert len(rows) == 1 and " 20 " in rows[0] and "queued" in rows[0]
    one_line_error(cli(store_url, "report", "--run", "demo", "--campaign", "99"), "no campaign 99")
    one_line_error(
        cli(store_url, "queue", "--run", "demo", "--scorers", "telepathy"),
        "unknown scorer 'telepathy'",
    )
    one_line_error(
        cli(store_url, "queue", "--run", "demo", "--retry-failed", "--scorers", "fuzzing"),
        "no campaign of this score config and LLM",
    )
    retried = cli(store_url, "queue", "--run", "demo", "--retry-failed", "--campaign", "1")
    assert "0 failed explain jobs queued again in campaign 1" in retried.stdout, retried.stderr


def test_a_campaign_explains_each_latent_once(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray
):
    """A latent used as another's shuffled control is explained once in the campaign, and
    its own job reuses that explanation (today's code explained it again each time)."""
    rules = ["digits", "parenthesis", "capitalised", "return", "class", "digits"]
    latents = store_planted_run(store, tokenizer, corpus_windows, rules)
    job = ScoreConfig.model_validate(LLM_FREE_JOB | {"shuffled_control": True})
    with store.session() as session, session.begin():
        assert queue_jobs(session, latents, "explain", job) == len(latents)
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}/v1"]))  # never asked
    stats = asyncio.run(ScoreWorkers(store, llm, home, workers=2, poll_seconds=0.05).run())
    assert stats.completed == len(latents)
    with store.read_session() as session:
        per_latent = session.execute(
            select(Explanation.latent_id, Explanation.explainer, func.count()).group_by(
                Explanation.campaign_id, Explanation.latent_id, Explanation.explainer
            )
        ).all()
        assert sorted(latent for latent, _, _ in per_latent) == sorted(latents)
        assert {count for _, _, count in per_latent} == {1}
        # Every latent's own and shuffled scores test explanations of this campaign.
        shuffled = session.scalars(select(Score).where(Score.control == "shuffled")).all()
        assert len(shuffled) == len(latents)
        assert (
            session.scalar(
                select(func.count())
                .select_from(Score)
                .join(Explanation, Explanation.id == Score.explanation_id)
                .where(Explanation.campaign_id != Score.campaign_id)
            )
            == 0
        )


LEGACY_CONFIG = {"explainers": ["llm"], "scorers": ["detection"]}


def test_results_stored_before_campaigns_are_kept_and_labelled(store_url: str):
    """A store at the revision before campaigns, with results: after the upgrade every job,
    score and call names a campaign that says its LLM was not recorded; of two explanations
    of one latent under one config the newer is the campaign's, the older is kept."""
    upgrade(store_url, "0003")
    store = open_store(store_url, check=False)
    tables = MetaData()
    tables.reflect(store.engine)
    t = tables.tables
    with store.engine.begin() as connection:
        now = connection.execute(select(func.current_timestamp())).scalar()
        (run_id,) = connection.execute(
            insert(t["run"]).returning(t["run"].c.id),
            {
                "name": "old",
                "subject_model": "smollm2",
                "hookpoint": "h",
                "dataset": "embedded",
                "architecture": "topk",
                "n_latents": 1,
                "k": 4,
                "seeds": [0],
                "config": {},
                "created_at": now,
            },
        ).one()
        (sae_id,) = connection.execute(
            insert(t["sae"]).returning(t["sae"].c.id),
            {
                "run_id": run_id,
                "seed": 0,
                "hookpoint": "h",
                "n_latents": 1,
                "d_in": 8,
                "architecture": "topk",
                "k": 4,
            },
        ).one()
        (latent_id,) = connection.execute(
            insert(t["latent"]).returning(t["latent"].c.id), {"sae_id": sae_id, "index": 0}
        ).one()
        jobs = [
            connection.execute(
                insert(t["job"]).returning(t["job"].c.id),
                {
                    "latent_id": latent_id,
                    "stage": stage,
                    "config_hash": "h1",
                    "config": LEGACY_CONFIG,
                    "state": "done",
                    "attempts": 1,
                    "max_attempts": 3,
                    "created_at": now,
                    "updated_at": now,
                },
            ).scalar_one()
            for stage in ("explain", "again")
        ]
        explanations = [
            connection.execute(
                insert(t["explanation"]).returning(t["explanation"].c.id),
                {
                    "latent_id": latent_id,
                    "job_id": job,
                    "explainer": "llm",
                    "model": "smollm2",
                    "config_hash": "h1",
                    "text": text,
                    "created_at": now,
                },
            ).scalar_one()
            for job, text in zip(jobs, ("older", "newer"), strict=True)
        ]
        connection.execute(
            insert(t["score"]),
            {
                "latent_id": latent_id,
                "explanation_id": explanations[1],
                "job_id": jobs[1],
                "scorer": "detection",
                "control": "own",
                "balanced_accuracy": 0.8,
                "n_examples": 4,
                "n_parsed": 4,
                "n_failed": 0,
                "created_at": now,
            },
        )
        connection.execute(
            insert(t["llm_call"]),
            {"job_id": jobs[1], "model": "smollm2", "base_url": "u", "created_at": now},
        )
    store.dispose()

    upgrade(store_url)
    store = open_store(store_url)
    with store.read_session() as session:
        (campaign,) = session.scalars(select(Campaign)).all()
        assert campaign.config == LEGACY_CONFIG and campaign.llm_model == "smollm2"
        assert campaign.llm is not None and "were not stored" in campaign.llm["legacy"]
        assert set(session.scalars(select(Job.campaign_id))) == {campaign.id}
        assert set(session.scalars(select(Score.campaign_id))) == {campaign.id}
        assert set(session.scalars(select(LlmCall.campaign_id))) == {campaign.id}
        kept = {e.text: e.campaign_id for e in session.scalars(select(Explanation))}
        assert kept == {"older": None, "newer": campaign.id}
    result = make_report(store, "old")
    assert result.report.campaign is not None
    assert "smollm2 (backend not recorded)" in result.report.campaign
    store.dispose()


def test_the_example_score_config_is_a_valid_job():
    import tomllib

    path = Path(__file__).resolve().parents[1] / "examples" / "score.toml"
    ScoreConfig.model_validate(tomllib.loads(path.read_text()))


def test_a_worker_of_an_llm_free_study_needs_no_server(store_url: str):
    """Only LLM-free campaigns in the store: `score` asks no server, also once the queue has
    drained (a worker restarted late just finishes); a campaign of another LLM is named."""
    upgrade(store_url)
    seed_run(store_url, n_latents=2)
    queued = cli(
        store_url, "queue", "--run", "demo", "--explainers", "token_baseline", "--scorers",
        "embedding",
    )  # fmt: skip
    assert "4 new explain jobs" in queued.stdout, queued.stdout + queued.stderr
    dead = f"http://127.0.0.1:{free_port()}/v1"
    for _ in range(2):  # with jobs (they fail: no windows cached), then with none left
        result = cli(store_url, "score", "--llm-url", dead, "--workers", "2")
        assert result.returncode == 0, result.stdout + result.stderr
    cli(store_url, "queue", "--run", "demo", "--model", "another-model")
    one_line_error(
        cli(store_url, "score", "--llm-url", dead), "campaign of another LLM (another-model"
    )


def test_campaigns_downgrade_to_config_hashes_and_back(store: Store):
    """Downgrading gives each campaign's jobs its config and a hash of their own (two LLMs
    of one config stay two jobs per latent); upgrading again labels them as recorded before
    campaigns."""
    from sqlalchemy import text

    job = {"explainers": ["llm"], "scorers": ["embedding"]}
    with store.session() as session, session.begin():
        ids = one_sae_run(session, 2)
        for model in ("a", "b"):
            queue_jobs(session, ids, "explain", job, llm=LLMConfig(model=model))
    downgrade_store(store, "0004")
    with store.engine.connect() as connection:
        rows = connection.execute(text("SELECT latent_id, config_hash, config FROM job")).all()
    assert len(rows) == 4 and len({row.config_hash for row in rows}) == 2
    store.dispose()
    upgrade(store.url)
    reopened = open_store(store.url)
    with reopened.read_session() as session:
        campaigns = session.scalars(select(Campaign)).all()
        assert len(campaigns) == 2 and all(c.llm and "legacy" in c.llm for c in campaigns)
        assert session.scalar(select(func.count()).select_from(Job)) == 4
    reopened.dispose()
