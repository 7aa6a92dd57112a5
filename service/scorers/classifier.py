"""What detection and fuzzing share: the LLM answers 1 or 0 for each of several numbered
windows in one request.

Items (window, label, marks) are shuffled with a seed so positives and negatives mix, then
sent `examples_per_request` at a time, all requests of a latent at once. The items' order and
batches depend only on the latent and the seed, and the prompts (v2 on) put the windows before
the explanation: the requests that score one batch of windows under several explanations
(the latent's own, the token baseline's, the controls') share all but their last lines, which
a server's prefix cache computes once.
The answer is asked for as JSON (enforced by guided decoding where the server has it) and
parsed leniently; an answer that cannot be read fails only the windows it should have
covered, which keep the raw text. With logprobs, each answer's probability of "1" comes from
the top alternatives at the answer token: P(1) / (P(1) + P(0)).
"""

from __future__ import annotations

import json
import math
import random
import re
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from service.cache.windows import ExampleSplit, Window
from service.concurrency import gather_or_cancel
from service.llm.base import (
    CallRecord,
    LLMClient,
    LLMError,
    Message,
    SamplingParams,
    TokenLogprob,
)
from service.llm.prompts import windows_prompt
from service.scorers.base import Scorer, ScoreResult, Verdict

TRUE_WORDS = {"1", "true", "yes"}
FALSE_WORDS = {"0", "false", "no"}
_NUMBERED = re.compile(
    r"^\W*(?:example\s*)?#?(\d+)\s*[:.)\-=]\s*\**\s*(1|0|yes|no|true|false)\b",
    re.IGNORECASE | re.MULTILINE,
)
_BARE = re.compile(r"^[\s,;01]+$")


@dataclass
class Item:
    """A window to classify, its true label and the tokens to mark (None: no marks)."""

    window: Window
    label: bool
    marks: list[bool] | None = None


@dataclass
class Answer:
    value: bool
    offset: int  # where the answer starts in the completion text


def answers_schema(n: int) -> dict[str, object]:
    return {
        "type": "object",
        "properties": {
            "answers": {
                "type": "array",
                "items": {"type": "integer", "enum": [0, 1]},
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": ["answers"],
        "additionalProperties": False,
    }


def _word(value: str) -> bool | None:
    word = value.strip().strip("\"'").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def parse_answers(text: str, n: int) -> list[Answer | None]:
    """One answer per example (None where none could be read), in example order.

    Accepts `{"answers": [1, 0, ...]}`, a bare or cut-off list `[1, 0, ...`, numbered lines
    (`2: yes`) or a bare run of digits (`1 0 1`). Extra answers are ignored.
    """
    answers: list[Answer | None] = [None] * n
    open_bracket = text.find("[")
    if open_bracket != -1:
        close = text.find("]", open_bracket)
        end = close if close != -1 else len(text)
        position = open_bracket + 1
        for index, item in enumerate(text[open_bracket + 1 : end].split(",")):
            if index < n:
                value = _word(item)
                if value is not None:
                    stripped = item.lstrip().lstrip("\"'")
                    answers[index] = Answer(value, position + len(item) - len(stripped))
            position += len(item) + 1
        return answers
    numbered = list(_NUMBERED.finditer(text))
    if numbered:
        for match in numbered:
            number = int(match.group(1))
            value = _word(match.group(2))
            if 1 <= number <= n and value is not None and answers[number - 1] is None:
                answers[number - 1] = Answer(value, match.start(2))
        return answers
    if text.strip() and _BARE.match(text):
        digits = [(m.group(), m.start()) for m in re.finditer(r"[01]", text)]
        for index, (digit, offset) in enumerate(digits[:n]):
            answers[index] = Answer(digit == "1", offset)
    return answers


def token_spans(text: str, tokens: Sequence[TokenLogprob]) -> list[tuple[int, int]] | None:
    """(start, end) of each token in `text`; special tokens the text omits get empty spans.
    None when the tokens do not spell the text."""
    spans = []
    position = 0
    for token in tokens:
        if token.token and text.startswith(token.token, position):
            spans.append((position, position + len(token.token)))
            position += len(token.token)
        else:
            spans.append((position, position))
    return spans if position == len(text) else None


def answer_probability(
    tokens: Sequence[TokenLogprob], spans: Sequence[tuple[int, int]], offset: int, text: str
) -> float | None:
    """P("1") / (P("1") + P("0")) at the token that holds the answer digit at `offset`."""
    if text[offset : offset + 1] not in ("0", "1"):
        return None
    for token, (start, end) in zip(tokens, spans, strict=True):
        if start <= offset < end:
            inner = offset - start
            as_one = token.token[:inner] + "1" + token.token[inner + 1 :]
            as_zero = token.token[:inner] + "0" + token.token[inner + 1 :]
            alternatives = dict(token.top)
            alternatives.setdefault(token.token, token.logprob)
            p_one = math.exp(alternatives[as_one]) if as_one in alternatives else 0.0
            p_zero = math.exp(alternatives[as_zero]) if as_zero in alternatives else 0.0
            total = p_one + p_zero
            return p_one / total if total > 0 else None
    return None


class ClassifierScorer(Scorer):
    """A scorer whose LLM labels windows 1/0; subclasses choose the items and the prompt."""

    @abstractmethod
    def items(self, split: ExampleSplit, rng: random.Random) -> list[Item]:
        """The windows to classify, with labels and marks."""

    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        if llm is None:
            raise ValueError(f"the {self.name} scorer needs an LLM client")
        rng = random.Random(seed)
        items = self.items(split, rng)
        rng.shuffle(items)
        size = self.config.examples_per_request
        batches = [items[start : start + size] for start in range(0, len(items), size)]
        outcomes = await gather_or_cancel(
            *(self._ask(explanation, batch, llm) for batch in batches)
        )
        result = ScoreResult(self.name, [])
        for verdicts, calls in outcomes:
            result.verdicts.extend(verdicts)
            result.calls.extend(calls)
        return result

    def messages(self, explanation: str, batch: Sequence[Item]) -> list[Message]:
        """The prompt asking for one answer per item of `batch` under `explanation`."""
        return windows_prompt(
            self.config.prompt(self.name),
            [(item.window.tokens, item.marks) for item in batch],
            explanation,
            n=len(batch),
        )

    async def _ask(
        self, explanation: str, batch: list[Item], llm: LLMClient
    ) -> tuple[list[Verdict], list[CallRecord]]:
        messages = self.messages(explanation, batch)
        params = SamplingParams(
            max_tokens=8 + self.config.answer_tokens_per_example * len(batch),
            temperature=self.config.temperature,
            seed=self.config.seed,
            logprobs=self.config.top_logprobs > 0,
            top_logprobs=self.config.top_logprobs,
            json_schema=answers_schema(len(batch)),
        )
        try:
            completion = await llm.chat(messages, params)
        except LLMError as error:
            if error.fails_the_job:
                raise
            failed = [Verdict(item.window, item.label, None, raw=str(error)) for item in batch]
            return failed, error.calls
        text = completion.text
        answers = parse_answers(text, len(batch))
        spans = token_spans(text, completion.tokens) if completion.tokens else None
        verdicts = []
        for item, answer in zip(batch, answers, strict=True):
            if answer is None:
                verdicts.append(Verdict(item.window, item.label, None, raw=text))
                continue
            probability = None
            if completion.tokens and spans is not None:
                probability = answer_probability(completion.tokens, spans, answer.offset, text)
            raw = json.dumps(int(answer.value))
            verdicts.append(Verdict(item.window, item.label, answer.value, probability, raw))
        return verdicts, completion.calls
