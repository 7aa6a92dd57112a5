"""The in-process `transformers` backend on the real SmolLM2: same interface, same pipeline."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sae.precision import compute_dtype
from service.cache.windows import LatentExamples, Window
from service.config import LLMConfig, ScoreConfig
from service.llm import SamplingParams, create_client
from service.llm.transformers_client import TransformersClient
from service.scorers.classifier import answers_schema, token_spans
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
    # Loaded in the dtype `auto` picks on this machine, which each call names.
    (call,) = first.calls
    dtype = str(compute_dtype("auto")).removeprefix("torch.")
    assert call.base_url == f"in-process ({dtype})" and call.prompt_tokens and call.latency_s > 0


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
    assert all(call.base_url == "in-process (float32)" for call in result.calls)


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


def reference_answer(model: Any, tokenizer: Any, prompt: str, schema: dict, max_tokens: int):
    """Greedy decoding the plain way: the whole sequence through the model for every token,
    logits masked to what the schema allows; (token ids, log-probability of each)."""
    import xgrammar

    vocab = model.config.vocab_size
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(schema, sort_keys=True), any_whitespace=False, separators=(",", ":")
    )
    matcher = xgrammar.GrammarMatcher(grammar)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"][0].tolist()
    generated: list[int] = []
    logprobs: list[float] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids + generated])).logits[:, -1].float()
            bitmask = xgrammar.allocate_token_bitmask(1, vocab)
            matcher.fill_next_token_bitmask(bitmask)
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            token = int(torch.argmax(logits[0]))
            generated.append(token)
            logprobs.append(float(torch.log_softmax(logits[0], dim=-1)[token]))
            matcher.accept_token(token)
            if token == tokenizer.eos_token_id or matcher.is_terminated():
                break
    return generated, logprobs


def test_forced_tokens_skip_their_steps_and_change_nothing(home: Path, smollm2):
    """Under a JSON schema, the tokens the schema forces (`{"answers":[`, the commas, `]}`)
    are fed without a forward pass of their own, and the answer is the plain greedy one:
    same tokens, same log-probabilities (0 for a forced token)."""
    prompt = (
        "For each of the numbers 3, 8, 1, 10, 7, 2, answer 1 if it is above 4 and 0 if not. "
        'Answer with JSON only: {"answers": [...]}'
    )
    schema = answers_schema(6)
    params = SamplingParams(max_tokens=30, logprobs=True, json_schema=schema)
    model, tokenizer = smollm2
    passes: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        client = TransformersClient("smollm2", home, loaded=smollm2)
        completion = asyncio.run(client.chat([{"role": "user", "content": prompt}], params))
    finally:
        hook.remove()
    expected, expected_logprobs = reference_answer(model, tokenizer, prompt, schema, 30)
    # The answer, and its log-probabilities, leave out the end-of-sequence token.
    assert expected[-1] == tokenizer.eos_token_id
    assert completion.text == tokenizer.decode(expected[:-1]) and completion.text.endswith("]}")
    assert completion.tokens is not None
    assert len(completion.tokens) == completion.completion_tokens == len(expected) - 1
    for token, logprob in zip(completion.tokens, expected_logprobs, strict=False):
        assert token.logprob == pytest.approx(logprob, abs=1e-4)
    forced = sum(logprob == 0.0 for logprob in expected_logprobs)
    assert forced >= 6  # the brackets and the commas at least
    # One prefill, then a pass per token the model chose (the last one's is not needed).
    assert len(passes) <= len(expected_logprobs) - forced + 1, (passes, expected_logprobs)
