"""Intruder scoring (delphi's): do the latent's windows share something another latent's
window lacks? Explanation-free.

Each question shows `intruder_examples` held-out activating windows of the latent and one
activating window of another latent (the intruder, from `split.intruders`: the shuffled
control latent's windows), in a seeded random order, each with its own firing tokens marked.
The LLM names the intruder (JSON, enforced where the server can; otherwise the first number
in the answer). Score: the accuracy per latent, the fraction of readable answers that name
the intruder, stored in the `balanced_accuracy` column (chance: 1 / (examples + 1)).

It tests the windows, not an explanation, so it runs under the `none` explainer only, and
scores latents whose explanation failed too. Each question is one verdict at the intruder's
window: label true (it is the intruder), predicted whether the LLM named it (None:
unreadable), probability the LLM's probability of the intruder's number where the server
returns logprobs.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.cache.windows import ExampleSplit, Window
from service.concurrency import gather_or_cancel
from service.llm.base import CallRecord, LLMClient, LLMError, SamplingParams, TokenLogprob
from service.llm.prompts import windows_prompt
from service.scorers.base import Scorer, ScoreResult, Verdict, register_scorer
from service.scorers.classifier import token_spans

_NUMBER = re.compile(r"\d+")


@dataclass
class IntruderResult(ScoreResult):
    """Verdicts per question; its balanced accuracy is the intruder accuracy."""

    @property
    def balanced_accuracy(self) -> float | None:
        parsed = self.parsed
        return sum(bool(v.predicted) for v in parsed) / len(parsed) if parsed else None

    @property
    def f1(self) -> float | None:
        return None

    @property
    def auc(self) -> float | None:
        return None


def intruder_schema(n: int) -> dict[str, object]:
    return {
        "type": "object",
        "properties": {"intruder": {"type": "integer", "enum": list(range(1, n + 1))}},
        "required": ["intruder"],
        "additionalProperties": False,
    }


def parse_intruder(text: str, n: int) -> tuple[int, int] | None:
    """(number named, its offset in `text`): the first whole number of the answer, which
    must be an example's (1..n); None otherwise."""
    match = _NUMBER.search(text)
    if match is None or not 1 <= int(match.group()) <= n:
        return None
    return int(match.group()), match.start()


def number_probability(
    text: str, offset: int, number: int, tokens: Sequence[TokenLogprob], n: int
) -> float | None:
    """The probability of `number` among the example numbers (1..n) at the token holding
    the answer written at `offset`; None when that token or no number is among its top
    alternatives."""
    spans = token_spans(text, tokens)
    if spans is None:
        return None
    for token, (start, end) in zip(tokens, spans, strict=True):
        if start <= offset < end:
            prefix = token.token[: offset - start]
            alternatives = dict(token.top)
            alternatives.setdefault(token.token, token.logprob)
            weights: dict[int, float] = {}
            for alternative, logprob in alternatives.items():
                rest = alternative[len(prefix) :] if alternative.startswith(prefix) else ""
                if rest.isdigit() and 1 <= int(rest) <= n:
                    weights[int(rest)] = weights.get(int(rest), 0.0) + math.exp(logprob)
            total = sum(weights.values())
            return weights.get(number, 0.0) / total if total > 0 else None
    return None


@dataclass
class Question:
    windows: list[Window]
    intruder: int  # 0-based position of the intruder among `windows`


@register_scorer
class IntruderScorer(Scorer):
    name = "intruder"
    needs_explanation = False
    uses_negatives = False

    def questions(self, split: ExampleSplit, seed: int) -> list[Question]:
        """Seeded questions: the latent's windows drawn from its held-out positives, the
        intruders taken in turn; none when there are fewer than 2 positives or no intruder."""
        rng = random.Random(seed)
        k = min(self.config.intruder_examples, len(split.positives))
        if k < 2 or not split.intruders:
            return []
        intruders = list(split.intruders)
        rng.shuffle(intruders)
        questions = []
        for number in range(self.config.intruder_questions):
            windows = rng.sample(split.positives, k)
            position = rng.randrange(k + 1)
            windows.insert(position, intruders[number % len(intruders)])
            questions.append(Question(windows, position))
        return questions

    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        if llm is None:
            raise ValueError("the intruder scorer needs an LLM client")
        questions = self.questions(split, seed)
        outcomes = await gather_or_cancel(*(self._ask(question, llm) for question in questions))
        result = IntruderResult(self.name, [])
        for verdict, calls in outcomes:
            result.verdicts.append(verdict)
            result.calls.extend(calls)
        return result

    async def _ask(self, question: Question, llm: LLMClient) -> tuple[Verdict, list[CallRecord]]:
        n = len(question.windows)
        intruder = question.windows[question.intruder]
        messages = windows_prompt(
            self.config.prompt(self.name),
            [(w.tokens, w.active(self.config.mark_fraction)) for w in question.windows],
            n=n,
        )
        params = SamplingParams(
            max_tokens=16,
            temperature=self.config.temperature,
            seed=self.config.seed,
            logprobs=self.config.top_logprobs > 0,
            top_logprobs=self.config.top_logprobs,
            json_schema=intruder_schema(n),
        )
        try:
            completion = await llm.chat(messages, params)
        except LLMError as error:
            if error.fails_the_job:
                raise
            return Verdict(intruder, True, None, raw=str(error)), error.calls
        text = completion.text
        answer = parse_intruder(text, n)
        if answer is None:
            return Verdict(intruder, True, None, raw=text), completion.calls
        named, offset = answer
        probability = None
        if completion.tokens:
            probability = number_probability(
                text, offset, question.intruder + 1, completion.tokens, n
            )
        verdict = Verdict(
            intruder, True, named == question.intruder + 1, probability, json.dumps(named)
        )
        return verdict, completion.calls
