"""Detection scoring: does the explanation pick out the windows where the latent fires?

Held-out activating windows (spread over activation quantiles) are mixed with windows on
which the latent is verified not to fire, shown without marks; the LLM says which ones the
explanation applies to. Score: balanced accuracy per latent, AUC from the answer logprobs.
"""

from __future__ import annotations

import random

from service.cache.windows import ExampleSplit
from service.scorers.base import register_scorer
from service.scorers.classifier import ClassifierScorer, Item


@register_scorer
class DetectionScorer(ClassifierScorer):
    name = "detection"

    def items(self, split: ExampleSplit, rng: random.Random) -> list[Item]:
        return [Item(window, True) for window in split.positives] + [
            Item(window, False) for window in split.negatives
        ]
