"""The simulation and intruder scorers and hard negatives end to end: through the real vLLM
server from a queued job to stored scores, and in process on the real SmolLM2.

Small on purpose (the LLM runs on the CPU): one planted latent with 12-token windows, three
simulated windows per negatives kind, two intruder questions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from planted_store import queue_jobs, store_planted_run
from sqlalchemy import select

from sae.checkpoint import SaeWeights, save_sparsify
from service.cache.windows import LatentExamples, Window
from service.config import LLMConfig, ScoreConfig, ScoringConfig
from service.llm import create_client
from service.llm.transformers_client import TransformersClient
from service.scoring.pipeline import explain_and_score
from service.scoring.worker import score_queue
from service.store.engine import open_store, upgrade
from service.store.models import Example, Explanation, LlmCall, Prediction, Sae, Score

JOB = ScoreConfig(
    explainers=["token_baseline"],
    scorers=["simulation", "intruder"],
    negatives="both",
    shuffled_control=False,
    cross_seed=0,
    n_explain_top=4,
    n_explain_quantile=0,
    n_positive=2,
    n_negative=1,
    intruder_questions=2,
    intruder_examples=2,
)


def _check_scores(scores: dict[str, Any], n_windows: int, n_questions: int) -> None:
    """What every stored or returned simulation and intruder score must satisfy."""
    for label in sorted(set(scores) & {"simulation", "simulation:hard"}):
        score = scores[label]
        assert score.n_examples == n_windows and score.n_parsed + score.n_failed == n_windows
        if score.correlation is not None:
            assert -1.0 <= score.correlation <= 1.0
        if score.n_parsed == 0:
            assert score.correlation is None
    intruder = scores["intruder"]
    assert intruder.n_examples == n_questions
    if intruder.n_parsed:
        assert intruder.balanced_accuracy in {0.0, 0.5, 1.0}
    else:
        assert intruder.balanced_accuracy is None


@pytest.mark.vllm
def test_simulation_intruder_and_hard_negatives_through_vllm(
    tmp_path: Path, home: Path, vllm_url: str, tokenizer: Any, corpus_windows: np.ndarray
):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    store = open_store(url)
    latent, neighbour = store_planted_run(
        store, tokenizer, corpus_windows[:, :12], ["digits", "parenthesis"]
    )
    # The SAE's checkpoint: the neighbour by decoder cosine is the other latent.
    cfg = {"architecture": "topk", "k": 1}
    weights = SaeWeights(torch.zeros(2, 2), torch.zeros(2), torch.eye(2), torch.zeros(2), cfg)
    save_sparsify(tmp_path / "sae", weights)
    with store.session() as session, session.begin():
        session.scalars(select(Sae)).one().path = str(tmp_path / "sae")
        queue_jobs(session, [latent], "explain", JOB)
    client = create_client(LLMConfig(urls=[vllm_url], retry_for_s=300), home)
    stats = asyncio.run(
        score_queue(store, client, home, ScoringConfig(workers=1), show_progress=False)
    )
    assert stats.completed == 1 and stats.failed == 0
    with store.read_session() as session:
        rows = session.execute(select(Score, Explanation.explainer).join(Explanation)).all()
        assert sorted((s.scorer, e) for s, e in rows) == [
            ("intruder", "none"),
            ("simulation", "token_baseline"),
            ("simulation:hard", "token_baseline"),
        ]
        scores = {s.scorer: s for s, _ in rows}
        _check_scores(scores, n_windows=3, n_questions=2)

        def owners(label: str, positive: bool) -> set[int]:
            return set(
                session.scalars(
                    select(Example.latent_id)
                    .join(Prediction, Prediction.example_id == Example.id)
                    .where(Prediction.score_id == scores[label].id, Prediction.label == positive)
                )
            )

        # Hard negatives and intruders are the neighbour's windows; the rest the latent's.
        assert owners("simulation:hard", False) == {neighbour}
        assert owners("simulation", False) == owners("simulation", True) == {latent}
        assert owners("intruder", True) == {neighbour}
        # A parsed window's raw answer is its 12 predicted activations.
        for label in ("simulation", "simulation:hard"):
            raws = session.scalars(
                select(Prediction.raw).where(
                    Prediction.score_id == scores[label].id, Prediction.predicted.is_not(None)
                )
            )
            assert all(len(json.loads(raw)) == 12 for raw in raws)
        stages = sorted(session.scalars(select(LlmCall.stage)))
        assert stages == ["intruder"] * 2 + ["simulation"] * 3 + ["simulation:hard"] * 3
    store.dispose()


@pytest.mark.slow
def test_simulation_and_intruder_in_process(home: Path, smollm2):
    def window(subject: str, fires: bool, kind: str = "top") -> Window:
        words = (subject, " should", " return", " it")
        acts = tuple(1.0 if fires and w == " return" else 0.0 for w in words)
        return Window(words, acts, kind)

    examples = LatentExamples(
        1,
        [
            window("It", True),
            window("They", True),
            window("We", True),
            window("Cats", False, "random"),
        ],
    )
    other = LatentExamples(
        2, [Window(("Pay", " 42", " dollars", "."), (0.0, 1.0, 0.0, 0.0), "top")]
    )
    hard = [Window(("I", " will", " yield", " it"), (0.0,) * 4, "hard")]
    # Hard negatives only (the vLLM test covers both kinds): 3 windows and 1 question.
    config = JOB.model_copy(
        update={"n_explain_top": 1, "intruder_questions": 1, "negatives": "hard"}
    )

    async def run():
        client = TransformersClient("smollm2", home, loaded=smollm2)
        return await explain_and_score(examples, config, client, other, hard_negatives=hard)

    result = asyncio.run(run())
    scores = {score.scorer: score for score in result.scores}
    assert sorted(scores) == ["intruder", "simulation:hard"]
    _check_scores(scores, n_windows=3, n_questions=1)
    assert [v.window.tokens[0] for v in scores["simulation:hard"].verdicts if not v.label] == ["I"]
    assert scores["intruder"].verdicts[0].window.tokens[1] == " 42"
    simulated = scores["simulation:hard"]
    assert len(simulated.truth) == len(simulated.predicted) == 4 * simulated.n_parsed
    if simulated.n_parsed and simulated.correlation is None:  # undefined only when constant
        assert len(set(simulated.predicted)) == 1 or len(set(simulated.truth)) == 1
    assert all(call.base_url == "in-process (float32)" for call in result.calls)
