"""A fleet of LLM servers: the real vLLM server on two ports (a TCP relay on each) shares the
requests evenly, and when one port goes away mid-run the other serves the rest, every request
answered exactly once. And the production loop on a fleet: two `autointerp score` processes on
one PostgreSQL store, both sending to the two ports, do every job exactly once, and
`autointerp status` shows the requests of each port.

Request i asks with i filler words, so its prompt token count tells whose answer it got."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import queue_jobs, store_planted_run
from sqlalchemy import select
from test_queue_faults import AUTOINTERP, Worker, start_worker
from test_scoring_vllm import SMALL, TcpRelay

from service.config import LLMConfig
from service.llm import Completion, Message, SamplingParams
from service.llm.base import ServerStats
from service.llm.openai_client import OpenAIClient
from service.store.engine import open_store, upgrade
from service.store.models import Explanation, Job, LlmCall

pytestmark = pytest.mark.vllm

REQUESTS = 200
CONCURRENCY = 8


def messages(i: int) -> list[Message]:
    return [{"role": "user", "content": "Say ok." + " x" * i}]


async def ask_all(
    client: OpenAIClient, on_answer: asyncio.Event | None = None, after: int = 0
) -> list[Completion]:
    """REQUESTS requests at once; `on_answer` is set when `after` of them are answered."""
    answered = 0

    async def ask(i: int) -> Completion:
        nonlocal answered
        completion = await client.chat(messages(i), SamplingParams(max_tokens=1))
        answered += 1
        if on_answer is not None and answered == after:
            on_answer.set()
        return completion

    return await asyncio.gather(*(ask(i) for i in range(REQUESTS)))


def assert_each_answered_once(completions: list[Completion]) -> None:
    assert len(completions) == REQUESTS
    for completion in completions:
        assert [call.error is None for call in completion.calls][-1:] == [True]
        assert sum(call.error is None for call in completion.calls) == 1
    # One filler word more per request: answers in request order, none swapped or repeated.
    prompt_tokens = [completion.calls[-1].prompt_tokens or 0 for completion in completions]
    assert prompt_tokens == sorted(set(prompt_tokens))


def test_two_ports_share_the_requests_evenly(vllm_url: str):
    async def run() -> tuple[list[Completion], list[ServerStats]]:
        relays = [TcpRelay(vllm_url), TcpRelay(vllm_url)]
        for relay in relays:
            await relay.start()
        client = OpenAIClient(
            LLMConfig(urls=[relay.url for relay in relays], max_concurrency=CONCURRENCY)
        )
        try:
            return await ask_all(client), client.servers()
        finally:
            await client.aclose()
            for relay in relays:
                await relay.stop()

    completions, servers = asyncio.run(run())
    assert_each_answered_once(completions)
    print("split:", [(server.base_url, server.requests) for server in servers])
    assert [server.errors for server in servers] == [0, 0]
    assert sum(server.requests for server in servers) == REQUESTS
    assert all(0.4 <= server.requests / REQUESTS <= 0.6 for server in servers)


def test_a_port_that_goes_away_mid_run_is_drained_to_the_other(vllm_url: str):
    async def run() -> tuple[list[Completion], ServerStats, list[ServerStats]]:
        staying, leaving = TcpRelay(vllm_url), TcpRelay(vllm_url)
        for relay in (staying, leaving):
            await relay.start()
        client = OpenAIClient(
            LLMConfig(urls=[staying.url, leaving.url], max_concurrency=CONCURRENCY)
        )
        quarter_done = asyncio.Event()
        answers = asyncio.create_task(ask_all(client, quarter_done, after=REQUESTS // 4))
        try:
            await quarter_done.wait()
            # Taken with no await before the stop cuts the connections: exact at the cut.
            (at_stop,) = [s for s in client.servers() if s.base_url == leaving.url]
            await leaving.stop()
            return await answers, at_stop, client.servers()
        finally:
            await client.aclose()
            await staying.stop()

    completions, at_stop, (staying, left) = asyncio.run(run())
    assert_each_answered_once(completions)
    print(f"before the stop {at_stop}; at the end {staying}, {left}")
    # The stop cut the requests in flight there (an answer already on its way may still
    # arrive); no request sent there after it was answered, so the other port did the rest.
    answered_before = at_stop.requests - at_stop.errors - at_stop.in_flight
    assert at_stop.in_flight > 0 and left.errors > at_stop.errors
    assert answered_before <= left.requests - left.errors <= answered_before + at_stop.in_flight
    answered_by = [completion.calls[-1].base_url for completion in completions]
    assert answered_by.count(staying.base_url) == staying.requests - staying.errors
    assert answered_by.count(left.base_url) == left.requests - left.errors
    assert staying.errors == 0 and staying.in_flight == left.in_flight == 0


@contextmanager
def relays_in_thread(target_url: str, n: int) -> Iterator[list[TcpRelay]]:
    """`n` TCP relays to `target_url` on an event loop of their own (a thread), for other
    processes to connect to while the test waits on them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started: list[TcpRelay] = []
    try:
        for _ in range(n):
            relay = TcpRelay(target_url)
            asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
            started.append(relay)
        yield started
    finally:
        for relay in started:
            asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


FLEET_RULES = ["digits", "parenthesis", "return", "class"]
FLEET_STAGE = "fleet"
SCORE_PROCESSES = 2
# vLLM on two CPU cores answers a few requests a second; four latents take a minute or two.
FLEET_TIMEOUT_S = 600


def test_score_processes_on_one_store_use_the_whole_fleet(
    postgres_url: str,
    home: Path,
    vllm_url: str,
    tokenizer: Any,
    corpus_windows: np.ndarray,
    tmp_path: Path,
):
    upgrade(postgres_url)
    store = open_store(postgres_url)
    processes: list[Worker] = []
    try:
        latents = store_planted_run(store, tokenizer, corpus_windows, FLEET_RULES)
        with store.session() as session, session.begin():
            queue_jobs(session, latents, FLEET_STAGE, SMALL)
        with relays_in_thread(vllm_url, 2) as relays:
            urls = [relay.url for relay in relays]
            options = tuple(option for url in urls for option in ("--urls", url))
            for number in range(SCORE_PROCESSES):
                processes.append(
                    start_worker(
                        f"score-{number}",
                        2,
                        postgres_url,
                        home,
                        tmp_path,
                        stage=FLEET_STAGE,
                        lease_seconds=60,
                        options=options,
                    )
                )
            for process in processes:
                try:
                    code = process.process.wait(FLEET_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    message = f"{process.name} did not finish\n{process.tail()}"
                    raise AssertionError(message) from None
                assert code == 0, f"{process.name} ended with {code}\n{process.tail()}"
        env = os.environ | {"AUTOINTERP_DB": postgres_url, "COLUMNS": "200"}
        status = subprocess.run(
            [AUTOINTERP, "status"], env=env, capture_output=True, text=True, check=True
        ).stdout
        with store.read_session() as session:
            jobs = session.scalars(select(Job)).all()
            explained = Counter(session.scalars(select(Explanation.job_id)))
            calls = session.execute(select(LlmCall.job_id, LlmCall.base_url, LlmCall.error)).all()
    finally:
        for process in processes:
            if process.process.poll() is None:
                process.process.kill()
                process.process.wait(30)
        store.dispose()

    # Every job done once, by one of the two processes: one explanation each (one explainer,
    # no controls), every LLM call recorded against one of the fleet's two ports.
    assert Counter(job.state for job in jobs) == {"done": len(FLEET_RULES)}
    assert all(job.attempts == 1 for job in jobs)
    assert all(any(p.owns(job.lease_owner) for p in processes) for job in jobs)
    assert explained == {job.id: 1 for job in jobs}
    assert {job_id for job_id, _, _ in calls} == {job.id for job in jobs}
    served = Counter(base_url for _, base_url, error in calls if error is None)
    assert set(served) == set(urls)
    # A call may fail on a loaded machine (a relay dropping a kept-alive connection); the job
    # then retried it, and the failure is recorded beside the answer that followed.
    failures = [(job_id, error) for job_id, _, error in calls if error is not None]
    assert len(failures) <= len(calls) // 10, failures
    # `autointerp status` reads the same calls back: one row per port, its requests and errors.
    tried = Counter(base_url for _, base_url, _ in calls)
    failed = Counter(base_url for _, base_url, error in calls if error is not None)
    for url in urls:
        (row,) = [line for line in status.splitlines() if url in line]
        numbers = [word for word in row.split() if word.isdigit()]
        assert numbers[:2] == [str(tried[url]), str(failed[url])], row
    print(
        "requests per port:",
        dict(served),
        "jobs per process:",
        {p.name: sum(p.owns(job.lease_owner) for job in jobs) for p in processes},
    )
