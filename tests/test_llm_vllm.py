"""The OpenAI client against the real vLLM server (SmolLM2 on CPU): structured answers with
logprobs, per-request parameters, one-line start-up errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae.errors import UserError
from service.config import LLMConfig
from service.llm import SamplingParams, create_client
from service.llm.serve import free_port
from service.scorers.classifier import answers_schema

pytestmark = pytest.mark.vllm

AUTOINTERP = str(Path(sys.executable).with_name("autointerp"))


def test_structured_answer_with_logprobs(vllm_url: str, home: Path):
    async def ask():
        client = create_client(LLMConfig(urls=[vllm_url]), home)
        await client.check()
        messages = [
            {"role": "system", "content": 'Answer with JSON {"answers": [0 or 1, ...]}.'},
            {"role": "user", "content": "Is 2 even? Is 3 even? Is 4 even?"},
        ]
        params = SamplingParams(
            max_tokens=30, logprobs=True, top_logprobs=5, json_schema=answers_schema(3)
        )
        try:
            return await client.chat(messages, params)
        finally:
            await client.aclose()

    completion = asyncio.run(ask())
    answers = json.loads(completion.text)["answers"]
    assert len(answers) == 3 and set(answers) <= {0, 1}
    assert completion.tokens is not None
    assert all(len(token.top) >= 1 for token in completion.tokens)
    (call,) = completion.calls
    assert call.prompt_tokens and call.prompt_tokens > 20
    assert call.completion_tokens == len(completion.tokens)
    assert call.error is None and call.base_url == vllm_url.rstrip("/")


def test_concurrent_requests_keep_their_own_parameters(vllm_url: str, home: Path):
    async def ask():
        client = create_client(LLMConfig(urls=[vllm_url]), home)
        messages = [{"role": "user", "content": "Count from one to fifty in words."}]
        try:
            return await asyncio.gather(
                *(
                    client.chat(messages, SamplingParams(max_tokens=n, logprobs=n == 1))
                    for n in (1, 24, 1, 24)
                )
            )
        finally:
            await client.aclose()

    completions = asyncio.run(ask())
    assert [c.completion_tokens for c in completions] == [1, 24, 1, 24]
    assert [c.tokens is not None for c in completions] == [True, False, True, False]


def test_wrong_model_is_one_clear_line(vllm_url: str, home: Path):
    async def check():
        client = create_client(LLMConfig(urls=[vllm_url], model="gpt-9"), home)
        try:
            await client.check()
        finally:
            await client.aclose()

    with pytest.raises(UserError, match=r"model 'gpt-9' is not served at .*it serves: smollm2"):
        asyncio.run(check())


def test_score_command_refuses_a_wrong_model_or_url_in_one_line(vllm_url: str, tmp_path: Path):
    environment = {**os.environ, "AUTOINTERP_DB": f"sqlite:///{tmp_path / 'store.db'}"}
    subprocess.run([AUTOINTERP, "db", "upgrade"], env=environment, check=True, capture_output=True)
    for args, fragment in (
        (["--llm-url", vllm_url, "--model", "nope"], "model 'nope' is not served"),
        (["--llm-url", f"http://127.0.0.1:{free_port()}"], "cannot reach the LLM server"),
    ):
        result = subprocess.run(
            [AUTOINTERP, "score", *args], env=environment, capture_output=True, text=True
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and fragment in lines[0], result.stderr
