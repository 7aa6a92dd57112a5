"""Fuzzing scoring: does the explanation say WHICH tokens fire?

Held-out activating windows are shown with their activating tokens marked (label 1);
non-activating windows are shown with as many randomly chosen tokens marked (label 0), the
counts drawn from the positives' so that the number of marks gives nothing away. The LLM says
whether each marking fits the explanation. Score: balanced accuracy, AUC from logprobs.
"""

from __future__ import annotations

import random

from service.cache.windows import ExampleSplit
from service.scorers.base import register_scorer
from service.scorers.classifier import ClassifierScorer, Item


@register_scorer
class FuzzingScorer(ClassifierScorer):
    name = "fuzzing"

    def items(self, split: ExampleSplit, rng: random.Random) -> list[Item]:
        fraction = self.config.mark_fraction
        positives = [Item(w, True, w.active(fraction)) for w in split.positives]
        counts = [sum(item.marks or []) for item in positives] or [1]
        negatives = []
        for window in split.negatives:
            length = len(window.tokens)
            n_marked = min(max(rng.choice(counts), 1), length)
            chosen = set(rng.sample(range(length), n_marked))
            negatives.append(Item(window, False, [i in chosen for i in range(length)]))
        return positives + negatives
