"""A fleet of LLM servers: the real vLLM server on two ports (a TCP relay on each) shares the
requests evenly, and when one port goes away mid-run the other serves the rest, every request
answered exactly once.

Request i asks with i filler words, so its prompt token count tells whose answer it got."""

from __future__ import annotations

import asyncio

import pytest
from test_scoring_vllm import TcpRelay

from service.config import LLMConfig
from service.llm import Completion, Message, SamplingParams
from service.llm.base import ServerStats
from service.llm.openai_client import OpenAIClient

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
