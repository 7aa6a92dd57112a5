"""Embedding scoring: no LLM, a sentence-embedding model ranks the held-out windows.

The explanation and every held-out window (activating and non-activating, unmarked) are
embedded; each window's probability is its cosine similarity to the explanation. Score: the
AUC of that similarity, activating vs non-activating. A small LLM's yes/no answers can be pure
noise; this ranking is not (MiniLM reaches AUC ~0.9 on clear lexical rules), so it tells
whether an explanation is specific even where the LLM scorers cannot. The binary prediction
is "similarity above the median of this latent's windows" (held-out sets are balanced), which
gives the balanced accuracy a meaning; the AUC is the scorer's primary metric.
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.cache.windows import ExampleSplit
from service.llm.base import LLMClient
from service.scorers.base import Scorer, ScoreResult, Verdict, register_scorer
from service.scorers.embedder import load_embedder


@register_scorer
class EmbeddingScorer(Scorer):
    name = "embedding"
    needs_llm = False
    # Windows are ranked by cosine, not answered yes or no.
    metric = "auc"

    def similarities(self, explanation: str, texts: list[str]) -> np.ndarray:
        """Cosine similarity of `explanation` to each text."""
        embedder = load_embedder(self.config.embedding_model)
        rows = embedder.embed([explanation, *texts])
        return rows[1:] @ rows[0]

    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        windows = split.positives + split.negatives
        labels = [True] * len(split.positives) + [False] * len(split.negatives)
        if not windows:
            return ScoreResult(self.name, [])
        # Embedding is CPU-bound: off the event loop, so other latents' requests keep flowing.
        similarity = await asyncio.to_thread(
            self.similarities, explanation, [w.text for w in windows]
        )
        threshold = float(np.median(similarity))
        verdicts = [
            Verdict(window, label, bool(value > threshold), float(value))
            for window, label, value in zip(windows, labels, similarity.tolist(), strict=True)
        ]
        return ScoreResult(self.name, verdicts)
