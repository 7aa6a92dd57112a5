"""One latent, start to finish, without the store: split its windows, explain them with each
explainer, then run every scorer on the held-out windows concurrently (the first request that
fails for good cancels the others: `gather_or_cancel`). The worker (store,
queue, progress), the calibration and the benchmark call `explain_and_score`.

Controls: given the windows of other latents, each explainer also explains THOSE latents
(each from its own split, exactly as that latent's own job would), and every scorer tests
those explanations on this latent's held-out windows, labelled with the control's name. An
explanation the campaign already holds (`known`: the latent's own, or a control's, written
by an earlier job) is reused, not asked for again. The
shuffled control is a random other latent of the same SAE: a scorer that rates a foreign
explanation as well as the latent's own is not measuring the explanation. Cross-seed scoring
uses the latent's matched partner in another seed: does the partner's explanation transfer?

Negatives: with `config.negatives` "hard" or "both", the scorers that use negatives also
score on a split whose negatives are hard ones (`neighbours`), their results labelled
`SCORER:hard`; with "hard" only those. Explanation-free scorers (intruder) run once, under
the `none` explainer, never under a control; their intruder windows are the control latent's
activating windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.cache.windows import ExampleSplit, LatentExamples, Window, split_examples
from service.concurrency import gather_or_cancel
from service.config import ScoreConfig
from service.config.score import NO_EXPLAINER
from service.explainers import Explainer, ExplanationResult, create_explainers
from service.llm.base import CallRecord, LLMClient
from service.scorers import Scorer, ScoreResult, create_scorers
from service.scorers.base import HARD_SUFFIX
from service.scoring.neighbours import hard_split

CONTROL_OWN = "own"
CONTROL_SHUFFLED = "shuffled"
CONTROL_CROSS_SEED = "cross_seed"
EXPLAIN_STAGE = "explain"


class NotScorable(Exception):
    """The latent lacks the windows to explain it (no activating example): retrying is moot."""


@dataclass(frozen=True)
class KnownExplanation:
    """An explanation the campaign already stored (row `id`), to be reused."""

    id: int
    result: ExplanationResult


@dataclass
class Explained:
    """One explanation and the scores it got on the scored latent's held-out windows.
    `source_latent_id` is the latent it explains: the scored latent itself, or for a
    control the other latent (of the same SAE, or the matched partner in another seed).
    `stored_id`: the stored explanation it reused (None: new, to be stored)."""

    explanation: ExplanationResult
    source_latent_id: int | None
    control: str = CONTROL_OWN
    scores: list[ScoreResult] = field(default_factory=list)
    stored_id: int | None = None


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
    def calls_by_stage(self) -> list[tuple[str, CallRecord]]:
        """Every LLM call, with the step it served: EXPLAIN_STAGE or the scorer's name."""
        return [
            (stage, call)
            for e in self.explained
            for stage, calls in [
                (EXPLAIN_STAGE, e.explanation.calls),
                *((score.scorer, score.calls) for score in e.scores),
            ]
            for call in calls
        ]

    @property
    def calls(self) -> list[CallRecord]:
        return [call for _, call in self.calls_by_stage]

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


def needs_llm(config: ScoreConfig) -> bool:
    """Whether any of the config's explainers or scorers asks an LLM (an unknown name is a
    user error here: every one is made, none skipped)."""
    explainers, scorers = create_explainers(config), create_scorers(config)
    return any(e.needs_llm for e in explainers) or any(s.needs_llm for s in scorers)


def needs_control(config: ScoreConfig) -> bool:
    """Whether a job needs another latent's windows: for the shuffled control, or as the
    intruders of an explanation-free scorer."""
    free = any(not scorer.needs_explanation for scorer in create_scorers(config))
    return config.shuffled_control or free


@dataclass(frozen=True)
class ScorerRun:
    """One scorer on one split, its results labelled `label` (`SCORER` or `SCORER:hard`)."""

    scorer: Scorer
    split: ExampleSplit
    label: str

    def applies_to(self, explainer: str) -> bool:
        """Explanation-free scorers run under the `none` explainer only, the others never."""
        return self.scorer.needs_explanation == (explainer != NO_EXPLAINER)


def scorer_runs(
    scorers: Sequence[Scorer], split: ExampleSplit, hard: ExampleSplit | None, negatives: str
) -> list[ScorerRun]:
    """Each scorer on the random negatives (unless `negatives` is "hard") and, for those that
    use negatives, on the hard ones `hard` (unless "random"); a scorer that ignores negatives
    runs once."""
    runs = []
    for scorer in scorers:
        if negatives != "hard" or not scorer.uses_negatives:
            runs.append(ScorerRun(scorer, split, scorer.name))
        if negatives != "random" and scorer.uses_negatives and hard is not None:
            runs.append(ScorerRun(scorer, hard, scorer.name + HARD_SUFFIX))
    return runs


def intruder_windows(examples: LatentExamples, other: LatentExamples | None) -> list[Window]:
    """Activating windows of `other` that are none of `examples`' windows."""
    if other is None:
        return []
    own = {w.tokens for w in examples.windows}
    return [w for w in other.windows if w.max_activation > 0 and w.tokens not in own]


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


async def _explain_and_score_one(
    explainer: Explainer,
    explained_split: ExampleSplit,
    source_latent_id: int | None,
    control: str,
    runs: list[ScorerRun],
    llm: LLMClient | None,
    seed: int,
    known: KnownExplanation | None,
) -> Explained:
    """One explainer's explanation of `explained_split`, scored by each of `runs` at once.

    Scoring starts the moment its explanation exists, not when every explanation does:
    scoring prompts put the held-out windows before the explanation, so the first scoring
    request of a window batch (usually the instant token baseline's) fills the server's prefix
    cache and the requests of the explanations that arrive later reuse it."""
    if known is not None:
        explained = Explained(known.result, source_latent_id, control, stored_id=known.id)
    else:
        explained = Explained(
            await explainer.explain(explained_split, llm), source_latent_id, control
        )
    explanation = explained.explanation
    if not explanation.parsed:
        return explained  # an unparseable explanation is kept, not scored
    mine = [run for run in runs if run.applies_to(explainer.name)]
    results = await gather_or_cancel(
        *(run.scorer.score(explanation.text, run.split, llm, seed) for run in mine)
    )
    for run, result in zip(mine, results, strict=True):
        result.control = control
        result.scorer = run.label
    explained.scores = list(results)
    return explained


async def explain_and_score(
    examples: LatentExamples,
    config: ScoreConfig,
    llm: LLMClient | None,
    control: LatentExamples | None = None,
    partners: Sequence[LatentExamples] = (),
    known: Mapping[tuple[int | None, str], KnownExplanation] | None = None,
    hard_negatives: Sequence[Window] = (),
) -> LatentResult:
    """Explain one latent with each explainer and score each explanation with each scorer.
    Score other latents' explanations on this latent's windows too: with `control` (another
    latent of the same SAE) and `config.shuffled_control`, that latent's, as `shuffled`; and
    those of the first `config.cross_seed` of `partners` (its matched partners in other
    seeds), as `cross_seed`. Another latent without an activating window is skipped. `known`
    maps (latent id, explainer) to an explanation already stored, used instead of a new one.
    `hard_negatives`: windows where the latent's neighbours fire (`config.negatives`); the
    intruder windows are `control`'s activating ones."""
    known = known or {}
    explainers = create_explainers(config)
    scorers = create_scorers(config)
    seed = latent_seed(config, examples.latent_id)
    split = split_for(examples, config)
    if not split.explain:
        raise NotScorable(f"latent {examples.latent_id} has no activating example to explain")
    split.intruders = intruder_windows(examples, control)
    hard = None
    if config.negatives != "random":
        hard = hard_split(split, list(hard_negatives), config.n_negative, seed)
    runs = scorer_runs(scorers, split, hard, config.negatives)
    others = (
        [(control, CONTROL_SHUFFLED)] if control is not None and config.shuffled_control else []
    )
    others += [(partner, CONTROL_CROSS_SEED) for partner in partners[: config.cross_seed]]
    sources = [(split, examples.latent_id, CONTROL_OWN)]
    for other, label in others:
        other_split = split_for(other, config)
        if other_split.explain:
            sources.append((other_split, other.latent_id, label))
    explained = await gather_or_cancel(
        *(
            _explain_and_score_one(
                explainer,
                source_split,
                source_id,
                label,
                runs,
                llm,
                seed,
                known.get((source_id, explainer.name)),
            )
            for source_split, source_id, label in sources
            for explainer in explainers
            # There is no explanation of the `none` explainer to swap in for a control.
            if label == CONTROL_OWN or explainer.name != NO_EXPLAINER
        )
    )
    return LatentResult(examples.latent_id, split, list(explained))
