"""Knowing when a score means something, on the real MiniLM and real corpus windows: the
embedding scorer separates a planted rule's windows with the right explanation and not with
a wrong one; the token baseline names a planted latent's token; the worker writes each
latent's LLM-free explanations, their scores and the shuffled specificity control in one
pass; and the report marks a working scorer informative and one fed shuffled labels not.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from planted_store import queue_jobs, store_planted_run
from sqlalchemy import select

from service.cache.windows import ExampleSplit, LatentExamples
from service.config import LLMConfig, ReportConfig, ScoreConfig
from service.explainers.token_baseline import TokenBaselineExplainer
from service.llm.base import LLMClient
from service.llm.openai_client import OpenAIClient
from service.llm.serve import free_port
from service.report.data import load_run_data
from service.report.report import build_report
from service.scorers.base import SCORERS, ScoreResult, Verdict
from service.scorers.embedding import EmbeddingScorer
from service.scoring.controls import control_latent
from service.scoring.pipeline import split_for
from service.scoring.planted import RULES, plant, to_latent_examples
from service.scoring.worker import ScoreWorkers
from service.store.engine import Store
from service.store.models import Explanation, Job, Prediction, Score

CONFIG = ScoreConfig(
    explainers=["token_baseline"],
    scorers=["embedding"],
    n_explain_top=10,
    n_explain_quantile=5,
    n_positive=15,
    n_negative=15,
)


def planted_examples(rule: str, tokenizer: Any, windows: np.ndarray, seed: int) -> LatentExamples:
    return to_latent_examples(plant(RULES[rule], windows, tokenizer, seed=seed), tokenizer, seed)


def embedding_auc(explanation: str, split: ExampleSplit) -> float:
    result = asyncio.run(EmbeddingScorer(CONFIG).score(explanation, split, None, 0))
    assert result.n_failed == 0 and result.calls == []
    assert all(v.probability is not None and -1 <= v.probability <= 1 for v in result.verdicts)
    assert result.auc is not None
    return result.auc


@pytest.mark.parametrize(
    ("rule", "wrong"), [("return", "numbers of animals in a zoo"), ("class", "the word 'return'")]
)
def test_embedding_scorer_separates_a_planted_rule_only_with_its_explanation(
    rule: str, wrong: str, tokenizer: Any, corpus_windows: np.ndarray
):
    split = split_for(planted_examples(rule, tokenizer, corpus_windows, 1), CONFIG)
    assert len(split.positives) == len(split.negatives) == 15
    right_auc = embedding_auc(RULES[rule].explanation, split)
    wrong_auc = embedding_auc(wrong, split)
    assert right_auc >= 0.85
    assert abs(wrong_auc - 0.5) <= 0.25
    assert right_auc - wrong_auc >= 0.3


def test_token_baseline_names_the_planted_token(tokenizer: Any, corpus_windows: np.ndarray):
    split = split_for(planted_examples("return", tokenizer, corpus_windows, 2), CONFIG)
    result = asyncio.run(TokenBaselineExplainer(CONFIG).explain(split, None))
    assert result.parsed and result.calls == []
    assert result.text == 'tokens "return"'
    assert embedding_auc(result.text, split) >= 0.8


class ShuffledLabelsScorer(EmbeddingScorer):
    """The embedding scorer with its verdicts' labels shuffled: a scorer that measures nothing,
    which the specificity control must catch."""

    name = "shuffled_labels"

    async def score(
        self, explanation: str, split: ExampleSplit, llm: LLMClient | None, seed: int
    ) -> ScoreResult:
        result = await super().score(explanation, split, llm, seed)
        labels = [v.label for v in result.verdicts]
        random.Random(seed).shuffle(labels)
        verdicts = [
            Verdict(v.window, label, v.predicted, v.probability)
            for v, label in zip(result.verdicts, labels, strict=True)
        ]
        return ScoreResult(self.name, verdicts)


@pytest.fixture
def shuffled_labels_scorer() -> Iterator[None]:
    SCORERS[ShuffledLabelsScorer.name] = ShuffledLabelsScorer
    yield
    del SCORERS[ShuffledLabelsScorer.name]


RULE_ORDER = ["return", "class", "parenthesis", "capitalised", "digits"] * 2


def store_planted(store: Store, tokenizer: Any, windows: np.ndarray) -> list[int]:
    """A run with one SAE whose latents fire by planted rules, their windows in the store."""
    return store_planted_run(store, tokenizer, windows, RULE_ORDER)


def test_specificity_control_marks_a_scorer_fed_shuffled_labels_uninformative(
    store: Store, home: Path, tokenizer: Any, corpus_windows: np.ndarray, shuffled_labels_scorer
):
    ids = store_planted(store, tokenizer, corpus_windows)
    config = CONFIG.model_copy(update={"scorers": ["embedding", "shuffled_labels"]})
    with store.session() as session, session.begin():
        queue_jobs(session, ids, "explain", config.model_dump())
    # Nothing here needs an LLM: a client to a closed port proves no request is made.
    llm = OpenAIClient(LLMConfig(urls=[f"http://127.0.0.1:{free_port()}"]))
    stats = asyncio.run(ScoreWorkers(store, llm, home, workers=2, poll_seconds=0.1).run())
    assert (stats.completed, stats.failed, stats.requests) == (len(ids), 0, 0)

    with store.read_session() as session:
        assert set(session.scalars(select(Job.state))) == {"done"}
        scores = session.scalars(select(Score)).all()
        explanations = {e.id: e for e in session.scalars(select(Explanation))}
        # Per latent and scorer: one own score and one shuffled control score.
        assert len(scores) == len(ids) * 2 * 2
        for score in scores:
            source = explanations[score.explanation_id]
            assert source.explainer == "token_baseline" and source.text.startswith("tokens ")
            if score.control == "own":
                assert source.latent_id == score.latent_id
            else:
                assert score.control == "shuffled" and source.latent_id != score.latent_id
                assert source.latent_id in ids
            assert score.n_examples == 30 and score.auc is not None
        predictions = session.scalars(select(Prediction)).all()
        assert len(predictions) == len(scores) * 30
        assert all(p.probability is not None and p.example_id is not None for p in predictions)
        # Every latent got its control (latents of the same SAE, all with windows).
        assert {s.latent_id for s in scores if s.control == "shuffled"} == set(ids)
        for latent_id in ids:
            drawn = control_latent(session, latent_id, seed=7)
            assert drawn in ids and drawn != latent_id
            assert control_latent(session, latent_id, seed=7) == drawn

    report = build_report(load_run_data(store, "planted"), ReportConfig(n_resamples=500))
    sections = {s.scorer: s for s in report.hookpoints[0].scorers}
    embedding, shuffled = sections["embedding"], sections["shuffled_labels"]
    assert embedding.explainer == "token_baseline" and embedding.metric == "auc"
    assert embedding.control is not None and embedding.control.n == len(ids)
    assert embedding.control.gap.mean is not None and embedding.control.gap.mean > 0.15
    assert embedding.informative is True
    assert shuffled.control is not None and shuffled.control.n == len(ids)
    assert shuffled.informative is False
