"""Simulation scoring (OpenAI's all-at-once variant): can the explanation predict the latent's
activation on every token?

Each held-out window (activating and non-activating alike) is one request: the LLM gets the
window's tokens, numbered, and the explanation, and answers with one activation per token on
a 0-10 scale (JSON, enforced by guided decoding where the server has it, parsed leniently).
Where the server returns log-probabilities, a token's prediction is the expected value of
the answer at that position (the probabilities of the numbers among the top alternatives,
renormalised); otherwise, or where no number is among the alternatives, it is the number
written. Score: the Pearson correlation of predicted and true activations over the tokens of
every window that parsed; undefined (NULL) when either is constant. A window whose answer
cannot be read (too few numbers, a number off the scale) is a parse failure and keeps its
raw text. Each window's verdict also says whether any token was predicted active (written
number above 0), with its highest expected value / 10 as the probability, so the window-level
metrics (balanced accuracy, AUC) are stored beside the correlation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from service.llm.prompts import choose_delimiters, load_prompt
from service.scorers.base import Scorer, ScoreResult, Verdict, register_scorer
from service.scorers.classifier import token_spans
from service.scorers.metrics import correlation

SCALE = 10
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class SimulationResult(ScoreResult):
    """Verdicts per window, plus every parsed token's true and predicted activation."""

    truth: list[float] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)

    @property
    def correlation(self) -> float | None:
        return correlation(self.truth, self.predicted)


@dataclass
class TokenPrediction:
    """One token's written number, where it starts in the answer text, its expected value."""

    value: int
    offset: int
    expected: float | None = None


def activations_schema(n: int) -> dict[str, object]:
    return {
        "type": "object",
        "properties": {
            "activations": {
                "type": "array",
                "items": {"type": "integer", "enum": list(range(SCALE + 1))},
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": ["activations"],
        "additionalProperties": False,
    }


def parse_activations(text: str, n: int) -> list[TokenPrediction] | None:
    """The first `n` numbers of the answer (of its first list when it has one), or None
    when there are fewer, or one is not a whole number from 0 to SCALE."""
    start = text.find("[")
    matches = [m for m in _NUMBER.finditer(text) if start == -1 or m.start() > start]
    if len(matches) < n:
        return None
    predictions = []
    for match in matches[:n]:
        number = match.group()
        if not number.isdigit() or int(number) > SCALE:
            return None
        predictions.append(TokenPrediction(int(number), match.start()))
    return predictions


def expected_value(
    tokens: Sequence[TokenLogprob],
    spans: Sequence[tuple[int, int]],
    prediction: TokenPrediction,
    text: str,
) -> float | None:
    """The expected number at `prediction` from the top alternatives of the token holding
    its first digit: each alternative that writes a number there counts with its
    probability. A tokenizer that splits "10" into "1" "0" has no token for 10: at the
    written 10's "1" the chosen alternative stands for 10, the others for what they write.
    None when no alternative writes a number."""
    length = len(str(prediction.value))
    for token, (start, end) in zip(tokens, spans, strict=True):
        if not start <= prediction.offset < end:
            continue
        inner = prediction.offset - start
        split_number = prediction.offset + length > end
        alternatives = dict(token.top)
        alternatives.setdefault(token.token, token.logprob)
        total = weighted = 0.0
        for alternative, logprob in alternatives.items():
            if not alternative.startswith(token.token[:inner]):
                continue
            digits = re.match(r"\d+", alternative[inner:])
            if digits is None:
                continue
            number = int(digits.group())
            if split_number and alternative == token.token:
                number = prediction.value
            if number > SCALE:
                continue
            probability = math.exp(logprob)
            total += probability
            weighted += probability * number
        return weighted / total if total > 0 else None
    return None


def render_tokens(tokens: Sequence[str]) -> str:
    """One line per token: its number and the token as a JSON string (so that newlines and
    spaces are visible and no token can start a line of its own)."""
    return "\n".join(
        f"{number} {json.dumps(token, ensure_ascii=False)}"
        for number, token in enumerate(tokens, 1)
    )


@register_scorer
class SimulationScorer(Scorer):
    name = "simulation"
    metric = "correlation"

    def messages(self, explanation: str, window: Window) -> list[Message]:
        """The prompt asking for one activation per token of `window` under `explanation`."""
        body = render_tokens(window.tokens)
        delimiters = choose_delimiters([body], [explanation])
        tag = delimiters.example_tag
        return load_prompt(self.config.prompt(self.name)).render(
            examples=f'<{tag} id="1">\n{body}\n</{tag}>',
            explanation=explanation,
            n=len(window.tokens),
            **delimiters.placeholders(),
        )

    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        if llm is None:
            raise ValueError("the simulation scorer needs an LLM client")
        labelled = [(w, True) for w in split.positives] + [(w, False) for w in split.negatives]
        outcomes = await gather_or_cancel(
            *(self._simulate(explanation, window, llm) for window, _ in labelled)
        )
        result = SimulationResult(self.name, [])
        for (window, label), (predictions, raw, calls) in zip(labelled, outcomes, strict=True):
            result.calls.extend(calls)
            if predictions is None:
                result.verdicts.append(Verdict(window, label, None, raw=raw))
                continue
            values = [p.value if p.expected is None else p.expected for p in predictions]
            result.truth.extend(max(value, 0.0) for value in window.activations)
            result.predicted.extend(values)
            expected = [p.expected for p in predictions]
            probability = (
                max(e for e in expected if e is not None) / SCALE
                if any(e is not None for e in expected)
                else None
            )
            active = any(p.value > 0 for p in predictions)
            raw_values = json.dumps([round(v, 3) for v in values])
            result.verdicts.append(Verdict(window, label, active, probability, raw_values))
        return result

    async def _simulate(
        self, explanation: str, window: Window, llm: LLMClient
    ) -> tuple[list[TokenPrediction] | None, str, list[CallRecord]]:
        n = len(window.tokens)
        params = SamplingParams(
            max_tokens=8 + self.config.answer_tokens_per_example * n,
            temperature=self.config.temperature,
            seed=self.config.seed,
            logprobs=self.config.top_logprobs > 0,
            top_logprobs=self.config.top_logprobs,
            json_schema=activations_schema(n),
        )
        try:
            completion = await llm.chat(self.messages(explanation, window), params)
        except LLMError as error:
            if error.fails_the_job:
                raise
            return None, str(error), error.calls
        text = completion.text
        predictions = parse_activations(text, n)
        if predictions is not None and completion.tokens:
            spans = token_spans(text, completion.tokens)
            if spans is not None:
                for prediction in predictions:
                    prediction.expected = expected_value(completion.tokens, spans, prediction, text)
        return predictions, text, completion.calls
