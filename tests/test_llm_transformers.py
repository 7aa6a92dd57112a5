"""The in-process `transformers` backend on the real SmolLM2: same interface, same pipeline."""

import asyncio
import json
from pathlib import Path

import pytest

from service.cache.windows import LatentExamples, Window
from service.config import LLMConfig, ScoreConfig
from service.llm import SamplingParams, create_client
from service.llm.transformers_client import TransformersClient
from service.scorers.classifier import token_spans
from service.scoring.pipeline import explain_and_score

pytestmark = pytest.mark.slow


def test_greedy_chat_with_logprobs(home: Path):
    async def ask():
        client = create_client(LLMConfig(backend="transformers"), home)  # loads the model
        await client.check()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        params = SamplingParams(max_tokens=12, logprobs=True, top_logprobs=3)
        return await client.chat(messages, params), await client.chat(messages, params)

    first, second = asyncio.run(ask())
    assert "Paris" in first.text
    assert first.text == second.text
    assert first.tokens is not None and len(first.tokens) == first.completion_tokens
    assert token_spans(first.text, first.tokens) is not None
    for token in first.tokens:
        assert len(token.top) == 3 and token.logprob <= 0.0
    (call,) = first.calls
    assert call.base_url == "in-process" and call.prompt_tokens and call.latency_s > 0


def test_pipeline_runs_in_process(home: Path, smollm2):
    def window(kind: str, subject: str, fires: bool, bin_: int | None = None) -> Window:
        words = (subject, " should", " return", " a", " value", ".")
        acts = tuple(1.0 if fires and w == " return" else 0.0 for w in words)
        return Window(words, acts, kind, bin_)

    examples = LatentExamples(
        1,
        [
            window("top", "It", True),
            window("quantile", "They", True, 0),
            window("random", "Cats", False),
        ],
    )
    config = ScoreConfig(
        explainers=["llm"],
        scorers=["detection", "fuzzing"],
        n_explain_top=1,
        n_explain_quantile=0,
        n_positive=1,
        n_negative=1,
        explanation_max_tokens=24,
    )

    async def run():
        client = TransformersClient("smollm2", home, loaded=smollm2)
        return await explain_and_score(examples, config, client)

    result = asyncio.run(run())
    assert [w.tokens[0] for w in result.split.explain] == ["It"]
    assert [w.tokens[0] for w in result.split.positives + result.split.negatives] == [
        "They",
        "Cats",
    ]
    explained = result.own("llm")
    assert explained.explanation.raw
    if explained.explanation.parsed:
        assert [s.scorer for s in explained.scores] == ["detection", "fuzzing"]
        for score in result.scores:
            assert score.n_examples == 2
            assert [v.label for v in score.verdicts].count(True) == 1
    assert all(call.base_url == "in-process" for call in result.calls)


def test_json_schema_is_enforced_in_process(home: Path, smollm2):
    """SmolLM2 alone rarely answers in the asked-for JSON; masked to the schema it must."""
    from service.scorers.classifier import answers_schema, parse_answers

    numbers = [3, 8, 1, 10, 2, 7]
    prompt = (
        f"For each of the numbers {', '.join(map(str, numbers))}, answer 1 if it is above 4 "
        'and 0 if not. Answer with JSON only: {"answers": [...]}'
    )
    params = SamplingParams(
        max_tokens=40, logprobs=True, top_logprobs=5, json_schema=answers_schema(len(numbers))
    )

    async def ask():
        client = TransformersClient("smollm2", home, loaded=smollm2)
        return await client.chat([{"role": "user", "content": prompt}], params)

    completion = asyncio.run(ask())
    answers = json.loads(completion.text)["answers"]
    assert len(answers) == len(numbers) and set(answers) <= {0, 1}
    assert completion.finish_reason == "stop"
    parsed = parse_answers(completion.text, len(numbers))
    assert all(answer is not None for answer in parsed)
