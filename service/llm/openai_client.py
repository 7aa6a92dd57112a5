"""The `openai` backend: any OpenAI-compatible chat-completions server, vLLM first.

Requests go over async httpx to one of several base URLs. A semaphore bounds the requests in
flight, and a request picks its server only once it holds a slot: the one with the fewest
requests in flight, ties taken in turn, skipping servers in back-off. Connection errors,
timeouts, 429 and 5xx answers put the server that gave them in back-off (exponential in its
failures in a row, full jitter) and the request is retried at once on a server not in
back-off, or, when every server is, as soon as the first one's back-off ends; so a server that
goes away mid-run is drained to the others, and a run outlives a restart of them all. A
request gives up after `retry_for_s`; any other error answer (a 400 for a prompt that is too
long...) fails it at once. Every attempt becomes a `CallRecord`, and `servers()` tells each
server's requests, errors and requests in flight.

The API key comes from the environment variable the config names and lives only in this
object's request headers: it is never logged, recorded or saved.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sae.errors import UserError
from service.config import LLMConfig
from service.llm.base import (
    CallRecord,
    Completion,
    LLMClient,
    LLMError,
    Message,
    SamplingParams,
    ServerStats,
    TokenLogprob,
    register_backend,
)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 15.0
CHECK_TIMEOUT_S = 10.0


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `.../v1` or `.../v1/` -> `http://host:port/v1`."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"LLM URL {url!r} must start with http:// or https://; fix --llm-url")
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass
class Endpoint:
    """One server's base URL and what this client knows of its load and health."""

    base_url: str
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    # Failed attempts since its last answer, and when the back-off they earned ends.
    failures_in_a_row: int = 0
    avoid_until: float = 0.0

    def failed(self, retry_after: float | None) -> None:
        self.errors += 1
        delay = backoff_s(self.failures_in_a_row, retry_after)
        self.failures_in_a_row += 1
        # Concurrent failures each draw a delay; the longest one stands.
        self.avoid_until = max(self.avoid_until, time.monotonic() + delay)


def backoff_floor_s(attempt: int) -> float:
    """The shortest back-off after failure number `attempt` (0-based): half its ceiling."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt) / 2


def backoff_s(attempt: int, retry_after: float | None = None) -> float:
    """Delay before retry number `attempt` (0-based): "equal jitter", between the floor and
    twice it under an exponential cap, so a failing server is surely avoided a while; or the
    server's Retry-After when it gave one."""
    if retry_after is not None:
        return min(retry_after, BACKOFF_CAP_S * 4)
    floor = backoff_floor_s(attempt)
    return random.uniform(floor, 2 * floor)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def request_body(
    model: str, messages: list[Message], params: SamplingParams, structured: bool
) -> dict[str, Any]:
    """The chat-completions JSON for one request, built fresh from its own parameters."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(message) for message in messages],
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:
        body["stop"] = list(params.stop)
    if params.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = params.top_logprobs
    if structured and params.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": params.json_schema},
        }
    return body


def parse_choice(payload: dict[str, Any]) -> tuple[str, list[TokenLogprob] | None, str | None]:
    """(text, tokens with logprobs or None, finish reason) of the first choice."""
    choice = payload["choices"][0]
    text = choice.get("message", {}).get("content") or ""
    tokens = None
    logprobs = choice.get("logprobs") or {}
    if logprobs.get("content"):
        tokens = [
            TokenLogprob(
                token=entry["token"],
                logprob=float(entry["logprob"]),
                top={alt["token"]: float(alt["logprob"]) for alt in entry.get("top_logprobs", [])},
            )
            for entry in logprobs["content"]
        ]
    return text, tokens, choice.get("finish_reason")


class OpenAIClient(LLMClient):
    """Chat completions against one or more OpenAI-compatible base URLs."""

    enforces_json_schema = True
    backend = "openai"

    def __init__(self, config: LLMConfig):
        if not config.urls:
            raise UserError("no LLM URL given; pass --llm-url http://HOST:PORT/v1")
        self.config = config
        self.model = config.model
        self.enforces_json_schema = config.structured_output
        self.endpoints = [Endpoint(normalize_base_url(url)) for url in config.urls]
        # Where the round-robin among equally loaded servers starts next.
        self._turn = 0
        self._semaphore = asyncio.Semaphore(config.concurrency)
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=config.concurrency + len(self.endpoints)),
        )

    def pick_endpoint(self) -> Endpoint:
        """The server for a request that has just got its slot: one not in back-off (when all
        are, the one whose back-off ends first), then the fewest in flight; ties in turn."""
        now = time.monotonic()
        count = len(self.endpoints)
        in_turn = [self.endpoints[(self._turn + i) % count] for i in range(count)]
        chosen = min(
            in_turn, key=lambda endpoint: (max(endpoint.avoid_until - now, 0.0), endpoint.in_flight)
        )
        self._turn = (self.endpoints.index(chosen) + 1) % count
        return chosen

    def servers(self) -> list[ServerStats]:
        return [
            ServerStats(endpoint.base_url, endpoint.requests, endpoint.errors, endpoint.in_flight)
            for endpoint in self.endpoints
        ]

    async def check(self) -> None:
        """Each URL must answer `/models` and serve `self.model`."""
        for endpoint in self.endpoints:
            url = f"{endpoint.base_url}/models"
            try:
                response = await self._http.get(url, timeout=CHECK_TIMEOUT_S)
            except httpx.HTTPError as error:
                raise UserError(
                    f"cannot reach the LLM server at {endpoint.base_url} "
                    f"({type(error).__name__}); start one with `autointerp llm serve --model "
                    f"{self.model}` or fix --llm-url"
                ) from None
            if response.status_code in (401, 403):
                raise UserError(
                    f"the LLM server at {endpoint.base_url} refused the API key (HTTP "
                    f"{response.status_code}); set {self.config.api_key_env}"
                )
            try:
                response.raise_for_status()
                served = [entry["id"] for entry in response.json()["data"]]
            except (httpx.HTTPStatusError, ValueError, KeyError, TypeError):
                raise UserError(
                    f"{url} did not answer like an OpenAI-compatible server (HTTP "
                    f"{response.status_code}); check --llm-url"
                ) from None
            if self.model not in served:
                raise UserError(
                    f"model {self.model!r} is not served at {endpoint.base_url} (it serves: "
                    f"{', '.join(served) or 'nothing'}); pass --model with one of those"
                )

    async def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        body = request_body(self.model, messages, params, self.config.structured_output)
        calls: list[CallRecord] = []
        deadline = time.monotonic() + self.config.retry_for_s
        while True:
            retry_after: float | None = None
            async with self._semaphore:
                # Picked only now: picked before the wait for a slot, every waiting request
                # would see the same loads and all would go to the same server.
                endpoint = self.pick_endpoint()
                endpoint.in_flight += 1
                endpoint.requests += 1
                started = time.monotonic()
                try:
                    response = await self._http.post(
                        f"{endpoint.base_url}/chat/completions", json=body
                    )
                    error: str | None = None
                except httpx.TransportError as transport_error:
                    response = None
                    error = f"{type(transport_error).__name__}: {transport_error}"
                finally:
                    endpoint.in_flight -= 1
                latency = time.monotonic() - started
            record = CallRecord(self.model, endpoint.base_url, latency, error=error)
            calls.append(record)
            if response is not None:
                if response.status_code == 200:
                    endpoint.failures_in_a_row = 0
                    return self._completion(response, record, calls)
                record.error = f"HTTP {response.status_code}: {_short(response.text)}"
                retryable = response.status_code == 429 or response.status_code >= 500
                if not retryable:
                    endpoint.errors += 1
                    raise LLMError(record.error, calls, status=response.status_code)
                retry_after = _retry_after(response)
            endpoint.failed(retry_after)
            # At once when a server is out of back-off, else when the first one's ends.
            delay = max(min(e.avoid_until for e in self.endpoints) - time.monotonic(), 0.0)
            if time.monotonic() + delay > deadline:
                raise LLMError(
                    f"gave up after {len(calls)} attempts over {self.config.retry_for_s:.0f} s; "
                    f"last: {record.error}",
                    calls,
                    transient=True,
                )
            await asyncio.sleep(delay)

    def _completion(
        self, response: httpx.Response, record: CallRecord, calls: list[CallRecord]
    ) -> Completion:
        try:
            payload = response.json()
            text, tokens, finish_reason = parse_choice(payload)
        except (ValueError, KeyError, IndexError, TypeError) as error:
            record.error = f"unreadable answer ({type(error).__name__}): {_short(response.text)}"
            raise LLMError(record.error, calls) from None
        usage = payload.get("usage") or {}
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        return Completion(text, tokens, finish_reason, calls)

    async def server_metric(self, name: str) -> float | None:
        """Sum of a Prometheus counter (e.g. `vllm:generation_tokens_total`) over the servers;
        None when a server does not expose it."""
        total = 0.0
        for endpoint in self.endpoints:
            root = endpoint.base_url.removesuffix("/v1")
            try:
                response = await self._http.get(f"{root}/metrics", timeout=CHECK_TIMEOUT_S)
                response.raise_for_status()
            except httpx.HTTPError:
                return None
            values = [
                float(line.rsplit(" ", 1)[1])
                for line in response.text.splitlines()
                if line.startswith((f"{name}{{", f"{name} "))
            ]
            if not values:
                return None
            total += sum(values)
        return total

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        # Never show headers: they may hold the API key.
        urls = json.dumps([endpoint.base_url for endpoint in self.endpoints])
        return f"OpenAIClient(model={self.model!r}, urls={urls})"


@register_backend("openai")
def _create(config: LLMConfig, _home: Path) -> LLMClient:
    return OpenAIClient(config)
