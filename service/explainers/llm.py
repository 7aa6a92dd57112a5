"""The `llm` explainer: show an LLM the latent's top and quantile windows with the activating
tokens marked (<<like this>>, or other marks the windows do not contain:
`service.llm.prompts`), and read one short explanation from its answer.

Parsing accepts what small models really write: the requested JSON, JSON cut off by the token
limit, an "Explanation:" line, or a bare phrase. An answer with no usable phrase is a parse
failure, kept with its raw text.
"""

from __future__ import annotations

import json
import re

from service.cache.windows import ExampleSplit
from service.explainers.base import Explainer, ExplanationResult, register_explainer
from service.llm.base import LLMClient, LLMError, Message, SamplingParams
from service.llm.prompts import windows_prompt

MAX_EXPLANATION_CHARS = 200
EXPLANATION_SCHEMA = {
    "type": "object",
    "properties": {"explanation": {"type": "string", "maxLength": MAX_EXPLANATION_CHARS}},
    "required": ["explanation"],
    "additionalProperties": False,
}
_JSON_FIELD = re.compile(r'"explanation"\s*:\s*"((?:[^"\\]|\\.)*)', re.IGNORECASE)
_LABELLED = re.compile(r"explanation\s*[:=-]\s*(.+)", re.IGNORECASE)


def _clean(text: str) -> str | None:
    text = " ".join(text.split()).strip().strip("\"'`*").strip()
    if len(text) > MAX_EXPLANATION_CHARS:
        text = text[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0]
    return text if re.search(r"\w", text) else None


def parse_explanation(raw: str) -> str | None:
    """The explanation phrase in an LLM's answer, or None when there is none."""
    text = re.sub(r"```(?:json)?", "", raw).strip()
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            value = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("explanation"), str):
            return _clean(value["explanation"])
    match = _JSON_FIELD.search(text)
    if match:
        try:
            return _clean(json.loads(f'"{match.group(1)}"'))
        except json.JSONDecodeError:
            return _clean(match.group(1))
    if text.startswith("{"):
        return None
    match = _LABELLED.search(text)
    if match:
        return _clean(match.group(1).splitlines()[0])
    lines = [line.strip().lstrip("-*• ") for line in text.splitlines() if line.strip()]
    # Small models often open with a preamble such as "The marked tokens have the following:"
    # and put the explanation on the next line.
    content = [line for line in lines if line and not line.endswith(":")]
    return _clean(content[0]) if content else (_clean(lines[0]) if lines else None)


@register_explainer
class LLMExplainer(Explainer):
    name = "llm"

    def messages(self, split: ExampleSplit) -> list[Message]:
        """The prompt: the windows shown to the explainer, firing tokens marked."""
        return windows_prompt(
            self.config.prompt("explain"),
            [(w.tokens, w.active(self.config.mark_fraction)) for w in split.explain],
        )

    async def explain(self, split: ExampleSplit, llm: LLMClient | None) -> ExplanationResult:
        if llm is None:
            raise ValueError("the llm explainer needs an LLM client")
        messages = self.messages(split)
        params = SamplingParams(
            max_tokens=self.config.explanation_max_tokens,
            temperature=self.config.temperature,
            seed=self.config.seed,
            json_schema=EXPLANATION_SCHEMA,
        )
        try:
            completion = await llm.chat(messages, params)
        except LLMError as error:
            if error.fails_the_job:
                raise
            return ExplanationResult(self.name, "", str(error), False, error.calls)
        text = parse_explanation(completion.text)
        return ExplanationResult(
            self.name, text or "", completion.text, text is not None, completion.calls
        )
