"""The OpenAI-compatible client: request bodies, secrets and retries against a real closed
port without a model; load spreading over two ports of the real vLLM server (TCP relays)."""

import asyncio
import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_scoring_vllm import TcpRelay

from sae.errors import UserError
from sae.precision import Precision
from service.config import LLMConfig, get_settings
from service.llm import Completion, LLMError, Message, SamplingParams, create_client
from service.llm.base import ServerStats
from service.llm.openai_client import (
    OpenAIClient,
    backoff_floor_s,
    backoff_s,
    normalize_base_url,
    request_body,
)
from service.llm.serve import VllmServer, free_port, start_server

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


def test_each_request_body_is_built_from_its_own_parameters():
    messages = [{"role": "user", "content": "hi"}]
    short = SamplingParams(max_tokens=1)
    rich = SamplingParams(
        max_tokens=50,
        temperature=0.7,
        seed=3,
        logprobs=True,
        top_logprobs=5,
        stop=("\n",),
        json_schema={"type": "object"},
    )
    body_rich = request_body("m", messages, rich, structured=True)
    body_short = request_body("m", messages, short, structured=True)
    assert body_short == {
        "model": "m",
        "messages": messages,
        "max_tokens": 1,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    assert body_rich["top_logprobs"] == 5 and body_rich["seed"] == 3
    assert body_rich["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "response_format" not in request_body("m", messages, rich, structured=False)
    body_rich["messages"][0]["content"] = "changed"
    assert messages[0]["content"] == "hi"
    with pytest.raises(Exception, match="frozen"):
        short.max_tokens = 9  # type: ignore[misc]


def test_base_urls_are_normalised():
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(UserError, match="must start with http"):
        normalize_base_url("h:1")


async def ask_many(client: OpenAIClient, count: int) -> list[Completion]:
    messages: list[Message] = [{"role": "user", "content": "hi"}]
    try:
        return await asyncio.gather(
            *(client.chat(messages, SamplingParams(max_tokens=1)) for _ in range(count))
        )
    finally:
        await client.aclose()


@pytest.mark.vllm
def test_requests_waiting_for_a_slot_spread_over_the_servers(vllm_url: str):
    async def run() -> list[ServerStats]:
        relays = [TcpRelay(vllm_url), TcpRelay(vllm_url)]
        for relay in relays:
            await relay.start()
        config = LLMConfig(urls=[relay.url for relay in relays], max_concurrency=2)
        client = OpenAIClient(config)
        try:
            await ask_many(client, 12)
        finally:
            for relay in relays:
                await relay.stop()
        return client.servers()

    # 12 requests for 2 slots: 10 wait, and each takes the server whose slot it got (chosen
    # before the wait, 11 went to the first server).
    first, second = asyncio.run(run())
    assert first.requests + second.requests == 12 and abs(first.requests - second.requests) <= 2
    assert first.errors == second.errors == first.in_flight == second.in_flight == 0


@pytest.mark.vllm
def test_a_server_that_refuses_connections_is_avoided(vllm_url: str):
    async def run() -> tuple[list[Completion], list[ServerStats]]:
        relay = TcpRelay(vllm_url)
        await relay.start()
        closed = f"http://127.0.0.1:{free_port()}/v1"
        # One at a time, so the refusing port's failures come one by one.
        client = OpenAIClient(LLMConfig(urls=[closed, relay.url], max_concurrency=1))
        try:
            return await ask_many(client, 12), client.servers()
        finally:
            await relay.stop()

    start = time.monotonic()
    completions, (refusing, serving) = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert all(completion.calls[-1].base_url == serving.base_url for completion in completions)
    assert serving.requests == 12 and serving.errors == 0
    # Tried at the start and again only when its back-off ends, not by every request: a k-th
    # try needs the floors of the k-1 back-offs before it to have passed, however slow the
    # server (on a fast one, 3 tries at most).
    waited = list(itertools.accumulate(backoff_floor_s(attempt) for attempt in range(12)))
    most = 1 + sum(total <= elapsed for total in waited)
    assert 1 <= refusing.requests == refusing.errors <= min(most, 11), (elapsed, refusing)


def test_backoff_grows_with_jitter_and_honours_retry_after():
    delays = [backoff_s(attempt) for attempt in range(12) for _ in range(20)]
    assert all(backoff_floor_s(a) <= backoff_s(a) <= 15.0 for a in range(12) for _ in range(20))
    assert all(0.25 <= backoff_s(0) <= 0.5 for _ in range(50))
    assert backoff_floor_s(11) == 7.5
    assert len({round(d, 6) for d in delays}) > 100
    assert backoff_s(0, retry_after=7.0) == 7.0


def test_api_key_comes_from_the_environment_and_is_never_shown(monkeypatch):
    monkeypatch.setenv("AUTOINTERP_LLM_API_KEY", "sk-secret-123")
    config = LLMConfig(urls=["http://a:1"])
    client = create_client(config, home=None)  # type: ignore[arg-type]
    assert isinstance(client, OpenAIClient)
    assert client._http.headers["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(client)
    assert "sk-secret" not in config.model_dump_json()
    asyncio.run(client.aclose())


def test_connection_refused_is_retried_then_reported_as_transient():
    config = LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"], retry_for_s=3.0)
    client = OpenAIClient(config)

    async def ask():
        try:
            await client.chat([{"role": "user", "content": "hi"}], SamplingParams())
        finally:
            await client.aclose()

    started = time.monotonic()
    with pytest.raises(LLMError) as caught:
        asyncio.run(ask())
    assert caught.value.transient
    assert len(caught.value.calls) >= 3
    assert all("ConnectError" in (call.error or "") for call in caught.value.calls)
    assert time.monotonic() - started < 10


def test_unreachable_server_is_one_clear_line_at_start():
    async def check():
        client = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}/v1"]))
        try:
            await client.check()
        finally:
            await client.aclose()

    with pytest.raises(UserError, match=r"cannot reach the LLM server at .*llm serve"):
        asyncio.run(check())


def test_unknown_backend_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown LLM backend 'ollama'"):
        create_client(LLMConfig(backend="ollama"), tmp_path)


def start_without_vllm(tmp_path: Path, precision: Precision = "auto") -> VllmServer:
    """`start_server` with this Python, which has no vLLM: its process ends at once."""
    return start_server(
        "smollm2",
        get_settings().home,
        python=Path(sys.executable),
        port=free_port(),
        log_path=tmp_path / "vllm.log",
        precision=precision,
    )


def test_serve_reports_a_missing_or_dying_server_in_one_line(tmp_path):
    from service.llm.serve import wait_ready

    result = subprocess.run(
        [AUTOINTERP, "llm", "serve", "--python", str(tmp_path / "nope" / "python")],
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "no Python at" in lines[0] and "--python" in lines[0]

    # A Python without vLLM: the server process dies at once, and the error quotes its log.
    server = start_without_vllm(tmp_path)
    with pytest.raises(UserError, match=r"vLLM exited with status 1 .*No module named 'vllm'"):
        wait_ready(server, timeout_s=60)
    assert not server.running()


def test_serve_runs_vllm_in_the_dtype_this_cpu_multiplies_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's CPU build runs bfloat16 where the CPU has no bfloat16 units too, several times
    # slower than float32 there: `auto` passes it the dtype the timed products pick, and a
    # precision given is passed as it is. (A Python without vLLM: the process ends at once,
    # after it was started with the command under test.)
    from sae import precision

    def dtype_passed(choice: Precision) -> str:
        server = start_without_vllm(tmp_path, choice)
        server.process.wait()
        args = [str(arg) for arg in server.process.args]  # type: ignore[union-attr]
        return args[args.index("--dtype") + 1]

    for gain, expected in ((0.0, "bfloat16"), (1e9, "float32")):
        monkeypatch.setattr(precision, "BFLOAT16_GAIN", gain)
        precision.bfloat16_is_faster.cache_clear()
        assert dtype_passed("auto") == expected
        assert dtype_passed("float32") == "float32"
        assert dtype_passed("bfloat16") == "bfloat16"
    precision.bfloat16_is_faster.cache_clear()
