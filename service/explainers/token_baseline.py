"""The `token_baseline` explainer: an explanation from activation statistics alone, no LLM.

It sums the latent's activation on each token text (stripped of surrounding whitespace) over
the windows the explainer is shown, and names the tokens carrying the most of it, strongest
first: `tokens "return", "yield"`. Every report sets each LLM explainer's scores beside this
baseline's: an LLM explanation that does not beat it adds nothing a token count would not.
"""

from __future__ import annotations

import json
from collections import defaultdict

from service.cache.windows import ExampleSplit
from service.explainers.base import Explainer, ExplanationResult, register_explainer
from service.llm.base import LLMClient

MAX_TOKENS = 5
# A token is named only when it carries at least this fraction of the strongest one's weight,
# so that a latent with one clear token gets a one-token explanation.
MIN_SHARE = 0.1


def top_tokens(split: ExampleSplit) -> list[tuple[str, float]]:
    """(token text, summed activation) of the strongest tokens, strongest first."""
    weight: dict[str, float] = defaultdict(float)
    for window in split.explain:
        for token, value in zip(window.tokens, window.activations, strict=True):
            text = token.strip()
            if value > 0 and text:
                weight[text] += value
    ranked = sorted(weight.items(), key=lambda item: (-item[1], item[0]))
    if not ranked:
        return []
    floor = ranked[0][1] * MIN_SHARE
    return [(text, value) for text, value in ranked[:MAX_TOKENS] if value >= floor]


@register_explainer
class TokenBaselineExplainer(Explainer):
    name = "token_baseline"
    needs_llm = False

    async def explain(self, split: ExampleSplit, llm: LLMClient | None) -> ExplanationResult:
        tokens = top_tokens(split)
        if not tokens:
            return ExplanationResult(self.name, "", None, False)
        text = "tokens " + ", ".join(json.dumps(token, ensure_ascii=False) for token, _ in tokens)
        raw = json.dumps({token: round(value, 4) for token, value in tokens}, ensure_ascii=False)
        return ExplanationResult(self.name, text, raw, True)
