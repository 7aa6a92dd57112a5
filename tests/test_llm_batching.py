"""The in-process backend's batches on the real SmolLM2: a request answered beside others gets
what it gets alone, a request that fails fails alone, and a batch never outgrows its limit."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from service.llm import Completion, LLMError, SamplingParams
from service.llm.transformers_client import TransformersClient
from service.scorers.classifier import answers_schema

pytestmark = pytest.mark.slow

# Float32 logits of one row differ in the last bits with the batch around it (the matrix
# products run on more rows); greedy tokens do not change, log-probabilities by < 1e-4.
LOGPROB_TOLERANCE = 1e-4

WINDOW = "The cat sat on the mat and looked at the bird outside the window. "
REQUESTS: list[tuple[str, SamplingParams]] = [
    (
        "What is the capital of France?",
        SamplingParams(max_tokens=10, logprobs=True, top_logprobs=3),
    ),
    (
        "For each of the numbers 3, 8, 1, 10, answer 1 if it is above 4 and 0 if not. "
        'Answer with JSON only: {"answers": [...]}',
        SamplingParams(max_tokens=14, logprobs=True, top_logprobs=2, json_schema=answers_schema(4)),
    ),
    ("hi", SamplingParams(max_tokens=8)),
    (WINDOW * 12 + "Where did the cat sit?", SamplingParams(max_tokens=10, logprobs=True)),
    ("List three colours, one per line.", SamplingParams(max_tokens=12, stop=("\n3",))),
    (
        WINDOW * 5 + 'Does the text mention a dog? Answer with JSON only: {"answers": [0 or 1]}',
        SamplingParams(max_tokens=9, json_schema=answers_schema(1)),
    ),
    ("Write one sentence about the sea.", SamplingParams(max_tokens=12, logprobs=True)),
    (WINDOW * 3 + "Summarise this in five words.", SamplingParams(max_tokens=6)),
]


@contextmanager
def input_shapes(model: Any) -> Iterator[list[tuple[int, int]]]:
    """(rows, positions) of the input ids of every forward pass of `model` while inside."""
    shapes: list[tuple[int, int]] = []

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        rows, positions = kwargs["input_ids"].shape
        shapes.append((int(rows), int(positions)))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield shapes
    finally:
        handle.remove()


def ask(client: TransformersClient, prompt: str, params: SamplingParams) -> Any:
    return client.chat([{"role": "user", "content": prompt}], params)


def assert_same(alone: Completion, batched: Completion) -> None:
    assert batched.text == alone.text
    assert batched.finish_reason == alone.finish_reason
    assert batched.completion_tokens == alone.completion_tokens
    assert batched.prompt_tokens == alone.prompt_tokens
    if alone.tokens is None:
        assert batched.tokens is None
        return
    assert batched.tokens is not None
    assert [t.token for t in batched.tokens] == [t.token for t in alone.tokens]
    for one, other in zip(alone.tokens, batched.tokens, strict=True):
        assert other.logprob == pytest.approx(one.logprob, abs=LOGPROB_TOLERANCE)
        assert set(other.top) == set(one.top)
        for token, logprob in one.top.items():
            assert other.top[token] == pytest.approx(logprob, abs=LOGPROB_TOLERANCE)


def test_a_batch_answers_as_one_request_at_a_time(home: Path, smollm2):
    """Eight greedy requests (prompts of 30 to 200 tokens, some under a JSON schema, some with
    logprobs, one with a stop string) sent together get what each gets sent alone."""

    async def one_at_a_time() -> list[Completion]:
        client = TransformersClient("smollm2", home, loaded=smollm2)
        return [await ask(client, prompt, params) for prompt, params in REQUESTS]

    async def together() -> list[Completion]:
        client = TransformersClient("smollm2", home, loaded=smollm2, max_batch=8)
        return list(await asyncio.gather(*(ask(client, *request) for request in REQUESTS)))

    with input_shapes(smollm2[0]) as alone_shapes:
        alone = asyncio.run(one_at_a_time())
    with input_shapes(smollm2[0]) as shapes:
        batched = asyncio.run(together())
    assert {rows for rows, _ in alone_shapes} == {1}
    assert max(rows for rows, _ in shapes) >= 4, shapes  # rows really were decoded together
    for one, other in zip(alone, batched, strict=True):
        assert_same(one, other)
    schema_answers = [alone[1].text, alone[5].text]
    assert all(text.startswith('{"answers":[') for text in schema_answers), schema_answers
    assert alone[4].finish_reason == "stop" and "\n3" not in alone[4].text
    for completion in batched:
        (call,) = completion.calls
        assert call.base_url == "in-process (float32)" and call.latency_s > 0
        assert call.completion_tokens == completion.completion_tokens


def test_seeded_sampling_does_not_depend_on_the_batch(home: Path, smollm2):
    """Each row samples from its own generator: the same seed gives the same answer alone
    and beside other requests."""
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    prompt = "Name an animal."

    async def run() -> tuple[Completion, list[Completion]]:
        client = TransformersClient("smollm2", home, loaded=smollm2)
        alone = await ask(client, prompt, params)
        others = [ask(client, f"Count to {n}.", SamplingParams(max_tokens=6)) for n in (3, 5)]
        batched = await asyncio.gather(ask(client, prompt, params), *others)
        return alone, list(batched)

    alone, batched = asyncio.run(run())
    assert batched[0].text == alone.text


def test_a_failing_request_fails_alone(home: Path, smollm2):
    """A prompt longer than the model's context is refused (LLMError with its call record)
    and the requests beside it are answered; a cancelled request leaves the batch."""
    context = smollm2[0].config.max_position_embeddings
    too_long = "word " * (context + 10)
    params = SamplingParams(max_tokens=6)

    async def run() -> list[Completion | BaseException]:
        client = TransformersClient("smollm2", home, loaded=smollm2)
        endless = SamplingParams(max_tokens=500)
        cancelled = asyncio.ensure_future(ask(client, "Tell me a long story.", endless))
        answers = asyncio.gather(
            ask(client, "What is 2+2?", params),
            ask(client, too_long, params),
            ask(client, "Say hello.", params),
            return_exceptions=True,
        )
        await asyncio.sleep(0)
        cancelled.cancel()
        results = await answers
        await client.aclose()
        return list(results)

    with input_shapes(smollm2[0]) as shapes:
        first, refused, last = asyncio.run(run())
    assert isinstance(first, Completion) and first.text
    assert isinstance(last, Completion) and last.text
    assert isinstance(refused, LLMError) and "context" in str(refused)
    (call,) = refused.calls
    assert call.error and call.base_url == "in-process (float32)"
    assert len(shapes) < 20, shapes  # the cancelled request did not go on to 500 tokens


def test_an_answer_stops_at_the_models_context(home: Path, smollm2):
    """A row stops when its next token would fall past the model's context, forced tokens
    (fed several at a time) included: with 5 positions left after the prompt, 6 tokens."""
    model, tokenizer = smollm2
    prompt = 'Answer with JSON only: {"answers": [0 or 1, 0 or 1, 0 or 1, 0 or 1]}'
    prompt_tokens = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )["input_ids"]
    )
    params = SamplingParams(max_tokens=30, json_schema=answers_schema(4))
    context = model.config.max_position_embeddings
    model.config.max_position_embeddings = prompt_tokens + 5
    try:
        client = TransformersClient("smollm2", home, loaded=smollm2)
        answer = asyncio.run(ask(client, prompt, params))
    finally:
        model.config.max_position_embeddings = context
    assert answer.finish_reason == "length" and answer.completion_tokens == 6, answer
    assert answer.text.startswith('{"answers":[')


def test_a_batch_never_outgrows_max_batch(home: Path, smollm2):
    async def run() -> list[Completion]:
        client = TransformersClient("smollm2", home, loaded=smollm2, max_batch=2)
        prompts = [f"Give a word that rhymes with {word}." for word in ("cat", "sun", "tree")]
        params = SamplingParams(max_tokens=5)
        return list(await asyncio.gather(*(ask(client, prompt, params) for prompt in prompts)))

    with input_shapes(smollm2[0]) as shapes:
        answers = asyncio.run(run())
    assert all(answer.text for answer in answers)
    assert max(rows for rows, _ in shapes) == 2, shapes


def test_a_shared_prompt_beginning_is_prefilled_once(home: Path, smollm2):
    """Prompts that begin alike (the same windows, another question, as a latent's own and
    control explanations are scored) are prefilled from where they part, and answer as they
    do with the prefix cache off."""
    windows = WINDOW * 10
    prompts = [
        windows + "Does the text mention a bird? Answer yes or no.",
        windows + "Does the text mention a dog? Answer yes or no.",
        windows + "Where did the cat sit?",
    ]
    params = SamplingParams(max_tokens=8, logprobs=True, top_logprobs=3)

    def answers(prefix_cache_tokens: int) -> tuple[list[Completion], list[int]]:
        async def run() -> list[Completion]:
            client = TransformersClient(
                "smollm2", home, loaded=smollm2, prefix_cache_tokens=prefix_cache_tokens
            )
            return [await ask(client, prompt, params) for prompt in prompts]

        with input_shapes(smollm2[0]) as shapes:
            completions = asyncio.run(run())
        return completions, [positions for _, positions in shapes if positions > 1]

    plain, plain_fed = answers(0)
    cached, cached_fed = answers(4096)
    for one, other in zip(plain, cached, strict=True):
        assert_same(one, other)
    prompt_tokens = [completion.prompt_tokens for completion in plain]
    assert plain_fed == prompt_tokens
    # The first prompt in full, the others from where they leave the first one's words.
    assert cached_fed[0] == prompt_tokens[0]
    assert all(n < 20 for n in cached_fed[1:]), (cached_fed, prompt_tokens)
