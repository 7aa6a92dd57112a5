"""The `none` explainer: no explanation at all, for the scorers that test a latent's windows
without one (the intruder scorer). It always succeeds, so those scorers also score latents
whose other explanations failed; the pipeline runs only explanation-free scorers under it
and never under a control (there is no explanation to swap).
"""

from __future__ import annotations

from service.cache.windows import ExampleSplit
from service.config.score import NO_EXPLAINER
from service.explainers.base import Explainer, ExplanationResult, register_explainer
from service.llm.base import LLMClient


@register_explainer
class NoExplainer(Explainer):
    name = NO_EXPLAINER
    needs_llm = False

    async def explain(self, split: ExampleSplit, llm: LLMClient | None) -> ExplanationResult:
        return ExplanationResult(self.name, "", None, True)
