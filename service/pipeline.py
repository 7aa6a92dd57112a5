"""One latent, start to finish, without the store: split its windows, explain them with each
explainer, then run every scorer on the held-out windows concurrently. The worker (store,
queue, progress), the calibration and the benchmark call `explain_and_score`.

The specificity control: given the windows of another latent of the same SAE, each explainer
also explains THAT latent (from its own split, exactly as that latent's own job would), and
every scorer tests those explanations on this latent's held-out windows, as `shuffled`
results. A scorer that rates a foreign explanation as well as the latent's own is not
measuring the explanation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.explainers import Explainer, ExplanationResult, create_explainers
from service.latent_examples import ExampleSplit, LatentExamples, split_examples
from service.llm.base import CallRecord, LLMClient
from service.score_config import ScoreConfig
from service.scorers import Scorer, ScoreResult, create_scorers

CONTROL_OWN = "own"
CONTROL_SHUFFLED = "shuffled"


class NotScorable(Exception):
    """The latent lacks the windows to explain it (no activating example): retrying is moot."""


@dataclass
class Explained:
    """One explanation and the scores it got on the scored latent's held-out windows.
    `source_latent_id` is the latent it explains: the scored latent itself, or for the
    shuffled control another latent of the same SAE."""

    explanation: ExplanationResult
    source_latent_id: int | None
    control: str = CONTROL_OWN
    scores: list[ScoreResult] = field(default_factory=list)


@dataclass
class LatentResult:
    latent_id: int | None
    split: ExampleSplit
    explained: list[Explained] = field(default_factory=list)

    def own(self, explainer: str) -> Explained:
        """The latent's own explanation by `explainer`, with its scores."""
        return next(
            e
            for e in self.explained
            if e.control == CONTROL_OWN and e.explanation.explainer == explainer
        )

    @property
    def scores(self) -> list[ScoreResult]:
        return [score for e in self.explained for score in e.scores]

    @property
    def calls(self) -> list[CallRecord]:
        return [
            call
            for e in self.explained
            for call in e.explanation.calls + [c for score in e.scores for c in score.calls]
        ]

    @property
    def n_answers(self) -> int:
        """Answers expected from the LLM: each LLM explanation and each LLM-scored window."""
        return sum(
            int(bool(e.explanation.calls)) + sum(s.n_examples for s in e.scores if s.calls)
            for e in self.explained
        )

    @property
    def n_parse_failures(self) -> int:
        return sum(
            int(bool(e.explanation.calls) and not e.explanation.parsed)
            + sum(s.n_failed for s in e.scores)
            for e in self.explained
        )


def latent_seed(config: ScoreConfig, latent_id: int | None) -> int:
    """Each latent draws its own windows; the same config and latent always draw the same."""
    return config.seed * 1_000_003 + (latent_id or 0)


def split_for(examples: LatentExamples, config: ScoreConfig) -> ExampleSplit:
    """The windows the explainer sees and the held-out ones the scorers get, for one latent."""
    return split_examples(
        examples,
        n_explain_top=config.n_explain_top,
        n_explain_quantile=config.n_explain_quantile,
        n_positive=config.n_positive,
        n_negative=config.n_negative,
        seed=latent_seed(config, examples.latent_id),
    )


async def _score_all(
    explained: Explained,
    scorers: list[Scorer],
    split: ExampleSplit,
    llm: LLMClient | None,
    seed: int,
) -> None:
    if not explained.explanation.parsed:
        return  # an unparseable explanation is kept, not scored
    text = explained.explanation.text
    results = await asyncio.gather(*(s.score(text, split, llm, seed) for s in scorers))
    for result in results:
        result.control = explained.control
    explained.scores = list(results)


async def _explain_all(
    explainers: list[Explainer],
    split: ExampleSplit,
    llm: LLMClient | None,
    source_latent_id: int | None,
    control: str,
) -> list[Explained]:
    explanations = await asyncio.gather(*(e.explain(split, llm) for e in explainers))
    return [Explained(e, source_latent_id, control) for e in explanations]


async def explain_and_score(
    examples: LatentExamples,
    config: ScoreConfig,
    llm: LLMClient | None,
    control: LatentExamples | None = None,
) -> LatentResult:
    """Explain one latent with each explainer and score each explanation with each scorer;
    with `control` (another latent of the same SAE) and `config.shuffled_control`, score that
    latent's explanations on this latent's windows too."""
    explainers = create_explainers(config)
    scorers = create_scorers(config)
    seed = latent_seed(config, examples.latent_id)
    split = split_for(examples, config)
    if not split.explain:
        raise NotScorable(f"latent {examples.latent_id} has no activating example to explain")
    tasks = [_explain_all(explainers, split, llm, examples.latent_id, CONTROL_OWN)]
    if control is not None and config.shuffled_control:
        control_split = split_for(control, config)
        if control_split.explain:
            tasks.append(
                _explain_all(explainers, control_split, llm, control.latent_id, CONTROL_SHUFFLED)
            )
    explained = [e for group in await asyncio.gather(*tasks) for e in group]
    await asyncio.gather(*(_score_all(e, scorers, split, llm, seed) for e in explained))
    return LatentResult(examples.latent_id, split, explained)
