"""The score worker's handling of jobs it cannot do, on both store backends: they fail at
once with a readable error instead of burning their attempts, and the run goes on."""

import asyncio
from pathlib import Path

import pytest
from planted_store import one_sae_run, queue_jobs
from pydantic import ValidationError
from sqlalchemy import select

from sae.errors import UserError
from service.config import LLMConfig
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store
from service.store.models import Explanation, Job


def test_unusable_jobs_fail_at_once_with_their_reason(store: Store, home: Path):
    with store.session() as session, session.begin():
        ids = one_sae_run(session, 3)
        queue_jobs(session, [ids[2]], "explain", {})  # no example windows stored
    # Never reached: every job fails before its first request.
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    stats = asyncio.run(ScoreWorkers(store, llm, home, workers=2, poll_seconds=0.1).run())
    assert (stats.completed, stats.failed, stats.requeued) == (0, 1, 0)
    with store.read_session() as session:
        (job,) = session.scalars(select(Job))
        assert job.state == "failed" and job.attempts == 1
        assert "no activating example" in (job.last_error or "")
        assert session.scalars(select(Explanation)).all() == []


def test_unusable_configs_are_refused_when_queued(store: Store):
    """A config that could never run is refused before any job exists, not failed later."""
    with store.session() as session, session.begin():
        ids = one_sae_run(session, 2)
        with pytest.raises(UserError, match="unknown scorer 'telepathy'"):
            queue_jobs(session, ids, "explain", {"scorers": ["telepathy"]})
        with pytest.raises(ValidationError, match="n_positive"):
            queue_jobs(session, ids, "explain", {"n_positive": "many"})
    with store.read_session() as session:
        assert session.scalars(select(Job)).all() == []
