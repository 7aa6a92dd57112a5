"""Permanent refusals by the real vLLM server (started with an API key by the session fixture):
a wrong key (401) and a model the server does not serve (404) fail the jobs with the
server's message, stop the run in one line naming the fix once the first jobs all met the
same refusal, and leave the failed jobs retryable; they are never stored as explanations
that "could not be parsed"."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import queue_jobs, store_planted_run
from sqlalchemy import func, select

from sae.errors import UserError
from service.config import API_KEY_ENV, LLMConfig, ScoreConfig
from service.llm.openai_client import OpenAIClient
from service.scoring.worker import FIRST_JOBS, ScoreWorkers
from service.store.engine import Store
from service.store.models import Explanation, Job, LlmCall
from service.store.queue import retry_failed

pytestmark = pytest.mark.vllm

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))
JOB = ScoreConfig(
    explainers=["llm"],
    scorers=["detection"],
    shuffled_control=False,
    cross_seed=0,
    n_explain_top=4,
    n_explain_quantile=0,
    n_positive=2,
    n_negative=2,
)
RULES = ["digits", "parenthesis", "capitalised", "return", "class", "digits"]


def queued(store: Store, tokenizer: Any, windows: np.ndarray, llm: LLMConfig) -> int:
    latents = store_planted_run(store, tokenizer, windows, RULES)
    with store.session() as session, session.begin():
        queue_jobs(session, latents, "explain", JOB, llm=llm)
        return int(session.scalar(select(Job.campaign_id).limit(1)) or 0)


@pytest.mark.parametrize(
    ("problem", "status", "fix"),
    [("wrong key", "HTTP 401", API_KEY_ENV), ("unserved model", "HTTP 404", "pass --model")],
)
def test_a_refusing_server_fails_the_first_jobs_and_stops_the_run(
    problem: str,
    status: str,
    fix: str,
    store: Store,
    home: Path,
    vllm_url: str,
    tokenizer: Any,
    corpus_windows: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
):
    llm = LLMConfig(urls=[vllm_url], model="smollm2" if problem == "wrong key" else "absent")
    if problem == "wrong key":
        monkeypatch.setenv(API_KEY_ENV, "not-the-key")
    campaign = queued(store, tokenizer, corpus_windows, llm)
    # The workers alone, without `score`'s check of the server first: as when a key is
    # revoked or a server swapped while a run goes on.
    workers = ScoreWorkers(store, OpenAIClient(llm), home, workers=2, poll_seconds=0.05)
    with pytest.raises(UserError) as raised:
        asyncio.run(workers.run())
    message = str(raised.value)
    assert "\n" not in message and status in message and fix in message, message
    assert "--retry-failed" in message
    with store.read_session() as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        # The first jobs failed (the slots in flight too), the rest were never claimed.
        assert FIRST_JOBS <= states["failed"] < len(RULES), states
        assert states["failed"] + states.get("queued", 0) == len(RULES), states
        errors = session.scalars(select(Job.last_error).where(Job.state == "failed")).all()
        assert all(status in (error or "") for error in errors), errors
        # Nothing passes for an explanation, and no call was written for a failed job.
        assert session.scalar(select(func.count()).select_from(Explanation)) == 0
        assert session.scalar(select(func.count()).select_from(LlmCall)) == 0
    with store.session() as session, session.begin():
        assert retry_failed(session, campaign, "explain") == states["failed"]
    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"queued"}
        assert set(session.scalars(select(Job.attempts))) == {0}


def test_score_with_a_wrong_key_ends_in_one_line_and_touches_no_job(
    store: Store, store_url: str, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    llm = LLMConfig(urls=[vllm_url])
    queued(store, tokenizer, corpus_windows, llm)
    env = {**os.environ, "AUTOINTERP_DB": store_url, API_KEY_ENV: "not-the-key"}
    result = subprocess.run(
        [AUTOINTERP, "score", "--llm-url", vllm_url, "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused the API key" in lines[0] and API_KEY_ENV in lines[0]
    assert "not-the-key" not in result.stdout + result.stderr
    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"queued"}
