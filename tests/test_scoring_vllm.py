"""End to end through HTTP on the real vLLM server: queued latents -> explanation ->
detection + fuzzing -> scores, verdicts and LLM calls in the store; truncated answers
recorded as parse failures; a server outage in mid-run survived with nothing lost or doubled.

Outages are made by a TCP relay in front of the real server: stopping it refuses new
connections and cuts open ones, as a stopped server does.

The latents are planted ones (known rules on windows of the embedded corpus) written into the
store's example table the way the latent cache writes them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from planted_store import queue_jobs, store_planted_run
from sqlalchemy import func, select

from service.cache.windows import load_latent_examples
from service.config import LLMConfig, ScoreConfig, ScoringConfig
from service.llm import SamplingParams, create_client
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.scoring.pipeline import split_for
from service.scoring.worker import score_queue
from service.store.engine import Store
from service.store.models import Explanation, Job, LlmCall, Prediction, Score

pytestmark = pytest.mark.vllm

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))

# Small enough for CPU: one explanation and one request per scorer for each latent.
SMALL = ScoreConfig(
    explainers=["llm"],
    scorers=["detection", "fuzzing"],
    shuffled_control=False,
    n_explain_top=6,
    n_explain_quantile=2,
    n_positive=4,
    n_negative=4,
    examples_per_request=8,
)


class TcpRelay:
    """Forwards 127.0.0.1:port to the server; `stop` drops the listener and every connection."""

    def __init__(self, target_url: str, port: int | None = None):
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


def planted_latents(
    store: Store, tokenizer: Any, windows: np.ndarray, rules: list[str]
) -> list[int]:
    """A run with one SAE whose latents fire by `rules`, with their example windows stored."""
    return store_planted_run(store, tokenizer, windows, rules)


def queue(store: Store, latent_ids: list[int], config: ScoreConfig) -> None:
    with store.session() as session, session.begin():
        queue_jobs(session, latent_ids, "explain", config.model_dump())


def run_workers(store: Store, home: Path, url: str, **options: Any):
    client = create_client(LLMConfig(urls=[url], retry_for_s=300), home)
    config = ScoringConfig(**options)
    return asyncio.run(score_queue(store, client, home, config, show_progress=False))


def test_queue_to_stored_scores_through_vllm(
    store: Store, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    latents = planted_latents(store, tokenizer, corpus_windows, ["digits", "parenthesis"])
    queue(store, latents, SMALL)
    stats = run_workers(store, home, vllm_url, workers=2)
    assert stats.completed == 2 and stats.failed == 0
    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"done"}
        explanations = session.scalars(select(Explanation)).all()
        assert sorted(e.latent_id for e in explanations) == sorted(latents)
        for explanation in explanations:
            assert explanation.model == "smollm2" and explanation.raw
            scores = session.scalars(
                select(Score).where(Score.explanation_id == explanation.id)
            ).all()
            if not explanation.text:  # an unparseable explanation is kept, not scored
                assert scores == []
                continue
            assert sorted(s.scorer for s in scores) == ["detection", "fuzzing"]
            for score in scores:
                assert score.n_examples == 8 and score.n_parsed + score.n_failed == 8
                predictions = session.scalars(
                    select(Prediction).where(Prediction.score_id == score.id)
                ).all()
                assert sum(p.label for p in predictions) == 4
                assert all(p.example_id is not None for p in predictions)
                parsed_labels = {p.label for p in predictions if p.predicted is not None}
                if parsed_labels == {True, False}:
                    assert score.balanced_accuracy is not None
                    assert 0.0 <= score.balanced_accuracy <= 1.0
                else:  # a class with no parsed answer leaves the metric undefined
                    assert score.balanced_accuracy is None
                if any(p.probability is not None for p in predictions):
                    assert score.auc is not None
            # the scored windows are not those the explainer saw: redo the worker's split
            examples = load_latent_examples(session, explanation.latent_id, tokenizer)
            shown = {w.example_id for w in split_for(examples, SMALL).explain}
            scored = set(
                session.scalars(
                    select(Prediction.example_id)
                    .join(Score, Score.id == Prediction.score_id)
                    .where(Score.explanation_id == explanation.id)
                )
            )
            assert len(shown) == 8 and len(scored) == 8 and not shown & scored
        calls = session.scalars(select(LlmCall)).all()
        assert len(calls) == stats.requests >= 2
        assert all(c.prompt_tokens and c.completion_tokens and c.latency_s for c in calls)
        assert all(c.error is None and c.job_id is not None for c in calls)
        # Per latent one explanation; per parsed explanation 8 windows, 8 per request: one
        # request per scorer.
        parsed = sum(1 for explanation in explanations if explanation.text)
        expected = ["explain"] * len(latents) + ["detection", "fuzzing"] * parsed
        assert sorted(c.stage for c in calls) == sorted(expected)


def test_truncated_answers_are_recorded_as_parse_failures(
    tmp_path: Path, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    from service.store.engine import open_store, upgrade

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    latents = planted_latents(store, tokenizer, corpus_windows, ["digits"])
    # A budget of 1 token per answer cuts the JSON off after the first few answers.
    queue(store, latents, SMALL.model_copy(update={"answer_tokens_per_example": 0}))
    stats = run_workers(store, home, vllm_url, workers=1)
    assert stats.completed == 1
    with store.read_session() as session:
        explanation = session.scalars(select(Explanation)).one()
        # Greedy decoding on fixed windows: the explanation is the same every run.
        assert explanation.text, f"no usable explanation to score: {explanation.raw!r}"
        scores = session.scalars(select(Score)).all()
        assert scores and all(s.n_failed > 0 for s in scores)
        failed = session.scalars(select(Prediction).where(Prediction.predicted.is_(None))).all()
        assert len(failed) == sum(s.n_failed for s in scores)
        assert all(p.raw is not None and p.raw.startswith("{") for p in failed)
    assert stats.parse_failures >= len(failed)
    store.dispose()


def test_server_outage_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    from service.store.engine import open_store, upgrade

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    latents = planted_latents(store, tokenizer, corpus_windows, ["digits", "parenthesis", "class"])
    queue(store, latents, SMALL)

    async def scenario():
        relay = TcpRelay(vllm_url)
        await relay.start()
        client = create_client(LLMConfig(urls=[relay.url], retry_for_s=300), home)
        run = asyncio.create_task(
            score_queue(store, client, home, ScoringConfig(workers=3), show_progress=False)
        )
        while relay.connections < 3:  # the check, then requests in flight
            await asyncio.sleep(0.1)
        await relay.stop()  # the server goes away: open requests cut, new ones refused
        await asyncio.sleep(5)
        await relay.start()  # and comes back on the same address
        try:
            return await run
        finally:
            await relay.stop()

    stats = asyncio.run(scenario())
    assert stats.completed == 3 and stats.failed == 0 and stats.requeued == 0
    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"done"}
        assert list(session.scalars(select(Job.attempts))) == [1, 1, 1]
        per_latent = session.execute(
            select(Explanation.latent_id, func.count()).group_by(Explanation.latent_id)
        ).all()
        assert sorted(per_latent) == sorted((latent, 1) for latent in latents)
        n_scores = session.scalar(select(func.count()).select_from(Score))
        n_explained = session.scalar(
            select(func.count()).select_from(Explanation).where(Explanation.text != "")
        )
        assert n_scores == 2 * n_explained
        errors = session.scalars(select(LlmCall.error).where(LlmCall.error.is_not(None))).all()
        assert errors, "the outage should show as failed attempts in llm_call"
    store.dispose()


def test_request_waits_for_a_server_that_comes_up(vllm_url: str):
    async def scenario():
        relay = TcpRelay(vllm_url)
        client = OpenAIClient(LLMConfig(urls=[relay.url], retry_for_s=120))
        request = asyncio.create_task(
            client.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=4))
        )
        await asyncio.sleep(3)  # nothing listens: connections are refused meanwhile
        await relay.start()
        try:
            return await request
        finally:
            await relay.stop()
            await client.aclose()

    completion = asyncio.run(scenario())
    failed = [call for call in completion.calls if call.error]
    assert len(failed) >= 2 and all("ConnectError" in (c.error or "") for c in failed)
    assert completion.calls[-1].error is None and completion.completion_tokens > 0


def test_interrupted_run_hands_its_jobs_back_and_the_command_resumes(
    tmp_path: Path, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    from service.store.engine import open_store, upgrade

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    latents = planted_latents(store, tokenizer, corpus_windows, ["digits", "capitalised"])
    queue(store, latents, SMALL)

    def leased() -> int:
        with store.read_session() as session:
            return len(session.scalars(select(Job).where(Job.state == "leased")).all())

    async def interrupt():
        client = create_client(LLMConfig(urls=[vllm_url]), home)
        run = asyncio.create_task(
            score_queue(store, client, home, ScoringConfig(workers=2), show_progress=False)
        )
        while await asyncio.to_thread(leased) < 2:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # requests in flight
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(interrupt())
    with store.read_session() as session:
        jobs = session.scalars(select(Job)).all()
        # Handed back uncounted: an interruption is not a failed attempt.
        assert [(j.state, j.attempts) for j in jobs] == [("queued", 0), ("queued", 0)]
        assert all("interrupted" in (j.last_error or "") for j in jobs)
        assert session.scalar(select(func.count()).select_from(Explanation)) == 0

    environment = {**os.environ, "AUTOINTERP_DB": url}
    result = subprocess.run(
        [AUTOINTERP, "score", "--llm-url", vllm_url, "--workers", "2"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "latents done" in result.stdout and "tokens/s" in result.stdout
    with store.read_session() as session:
        jobs = session.scalars(select(Job)).all()
        assert [(j.state, j.attempts) for j in jobs] == [("done", 1)] * 2
        per_latent = session.execute(
            select(Explanation.latent_id, func.count()).group_by(Explanation.latent_id)
        ).all()
        assert sorted(per_latent) == sorted((latent, 1) for latent in latents)
    store.dispose()
