"""The store's tables as SQLAlchemy 2.0 ORM classes: everything the study records.

Runs own SAEs, SAEs own latents, pairs of SAEs own per-latent matches; latents own example
windows, queue jobs, explanations and scores. Alembic migrations in `migrations/` are what
create and change these tables; this module is what they are compared against.

Timestamps are naive UTC (`utcnow()`); both backends store them without a zone so that
lease arithmetic compares like with like.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints let later migrations drop or alter them by name, which SQLite's batch
# mode needs (it rebuilds the table and must know what each constraint is called).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")

JOB_STATES = ("queued", "leased", "done", "failed")
# Which explanation a score tested (`score.control`): the latent's own; a random other
# latent's of the same SAE (the specificity control); its matched partner's in another seed.
CONTROL_OWN = "own"
CONTROL_SHUFFLED = "shuffled"
CONTROL_CROSS_SEED = "cross_seed"
EXAMPLE_KINDS = ("top", "quantile", "random")


def utcnow() -> datetime:
    """Naive UTC now, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONType, list[int]: JSONType}


class Run(Base):
    """One study: a subject model, a hookpoint, a dataset and SAEs trained with several seeds."""

    __tablename__ = "run"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    subject_model: Mapped[str] = mapped_column(String(500))
    hookpoint: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(500))
    architecture: Mapped[str] = mapped_column(String(50))
    n_latents: Mapped[int]
    k: Mapped[int | None]
    seeds: Mapped[list[int]]
    path: Mapped[str | None] = mapped_column(String(1000))
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Sae(Base):
    """One trained SAE of a run: its seed, where its weights lie, and its final quality."""

    __tablename__ = "sae"
    __table_args__ = (UniqueConstraint("run_id", "hookpoint", "seed"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    seed: Mapped[int]
    hookpoint: Mapped[str] = mapped_column(String(200))
    path: Mapped[str | None] = mapped_column(String(1000))
    n_latents: Mapped[int]
    d_in: Mapped[int]
    architecture: Mapped[str] = mapped_column(String(50))
    k: Mapped[int | None]
    fvu: Mapped[float | None] = mapped_column(Float)
    l0: Mapped[float | None] = mapped_column(Float)
    dead_fraction: Mapped[float | None] = mapped_column(Float)


class Latent(Base):
    """One latent of an SAE; firing statistics are filled in by the latent cache."""

    __tablename__ = "latent"
    __table_args__ = (UniqueConstraint("sae_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("sae.id", ondelete="CASCADE"))
    index: Mapped[int]
    firing_count: Mapped[int | None]
    firing_frequency: Mapped[float | None] = mapped_column(Float)
    max_activation: Mapped[float | None] = mapped_column(Float)


class MatchPair(Base):
    """The matching of SAE A's latents onto SAE B's, with its summary numbers."""

    __tablename__ = "match_pair"
    __table_args__ = (UniqueConstraint("sae_a_id", "sae_b_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sae_a_id: Mapped[int] = mapped_column(ForeignKey("sae.id", ondelete="CASCADE"))
    sae_b_id: Mapped[int] = mapped_column(ForeignKey("sae.id", ondelete="CASCADE"), index=True)
    solver: Mapped[str] = mapped_column(String(50))
    threshold: Mapped[float] = mapped_column(Float)
    n_latents: Mapped[int]
    shared_fraction: Mapped[float] = mapped_column(Float)
    shared_fraction_decoder_only: Mapped[float] = mapped_column(Float)
    encoder_decoder_agreement: Mapped[float] = mapped_column(Float)
    # NULL: no latent of A had a partner (all directions zero or not finite).
    mean_cos_decoder: Mapped[float | None] = mapped_column(Float)
    mean_cos_encoder: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)


class Match(Base):
    """Latent `latent_index_a` of SAE A: its partners in B under decoder and encoder matching."""

    __tablename__ = "match"
    __table_args__ = (
        UniqueConstraint("pair_id", "latent_index_a"),
        Index("ix_match_pair_id_shared", "pair_id", "shared"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("match_pair.id", ondelete="CASCADE"))
    latent_index_a: Mapped[int]
    partner_decoder: Mapped[int]
    cos_decoder: Mapped[float | None] = mapped_column(Float)  # NULL: unmatched
    partner_encoder: Mapped[int]
    cos_encoder: Mapped[float | None] = mapped_column(Float)
    shared: Mapped[bool] = mapped_column(Boolean)
    agree: Mapped[bool] = mapped_column(Boolean)


class CacheVersion(Base):
    """One `cache` of a run under one resolved cache config: the windows it wrote point to it.

    `version` counts 1, 2, ... per run. `config` and `config_hash` are NULL for windows
    written before versions were recorded (migration 0004) or added by hand: their config
    is unknown. `completed_at` is NULL while the windows are still being written; readers
    only see complete versions."""

    __tablename__ = "cache_version"
    __table_args__ = (UniqueConstraint("run_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    config: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    )
    config_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)


class Example(Base):
    """A window of tokens with the latent's activation on each (see `results.encode_window`)."""

    __tablename__ = "example"
    __table_args__ = (
        Index("ix_example_latent_id_kind", "latent_id", "kind"),
        Index("ix_example_cache_version_id_latent_id", "cache_version_id", "latent_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    latent_id: Mapped[int] = mapped_column(ForeignKey("latent.id", ondelete="CASCADE"))
    cache_version_id: Mapped[int] = mapped_column(
        ForeignKey("cache_version.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(20))
    quantile_bin: Mapped[int | None]
    rank: Mapped[int]
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)
    activations: Mapped[bytes] = mapped_column(LargeBinary)
    max_activation: Mapped[float] = mapped_column(Float)
    text: Mapped[str | None] = mapped_column(Text)


class Campaign(Base):
    """One scoring campaign: a resolved score config and the LLM that explains and scores
    under it. Its jobs, explanations, scores and LLM calls point to it, so results of two
    configs or two models are never compared as one. `key` hashes the config and the LLM's
    identity (backend and served model name; the server URLs are recorded in `llm`, not
    keyed: adding a server to the fleet does not start a new campaign). A campaign whose
    explainers and scorers ask no LLM has no LLM (`llm_model` NULL): any worker serves it.
    """

    __tablename__ = "campaign"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    config: Mapped[dict[str, Any]]
    llm_backend: Mapped[str | None] = mapped_column(String(50))
    llm_model: Mapped[str | None] = mapped_column(String(200))
    llm: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """One unit of queued work: a stage (explain, score...) on a latent in one campaign."""

    __tablename__ = "job"
    __table_args__ = (
        UniqueConstraint("latent_id", "stage", "campaign_id"),
        Index("ix_job_state_stage", "state", "stage"),
        Index("ix_job_finished_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    latent_id: Mapped[int] = mapped_column(ForeignKey("latent.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(50))
    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaign.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(10), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Explanation(Base):
    """A short natural-language explanation of a latent, from one explainer and model: at
    most one per latent, explainer and campaign, reused wherever the campaign needs it (the
    latent's own job, or another latent's job that uses it as a control). NULL campaign:
    an explanation stored before campaigns that a newer one of its config superseded."""

    __tablename__ = "explanation"
    __table_args__ = (UniqueConstraint("campaign_id", "latent_id", "explainer"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    latent_id: Mapped[int] = mapped_column(ForeignKey("latent.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(
        ForeignKey("campaign.id", ondelete="CASCADE"), index=True
    )
    explainer: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    raw: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Score(Base):
    """How well an explanation predicts a latent under one scorer and one control."""

    __tablename__ = "score"
    __table_args__ = (
        Index("ix_score_latent_id_campaign_id_scorer", "latent_id", "campaign_id", "scorer"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    latent_id: Mapped[int] = mapped_column(ForeignKey("latent.id", ondelete="CASCADE"))
    explanation_id: Mapped[int] = mapped_column(
        ForeignKey("explanation.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(
        ForeignKey("campaign.id", ondelete="CASCADE"), index=True
    )
    scorer: Mapped[str] = mapped_column(String(100))
    control: Mapped[str] = mapped_column(String(50), default=CONTROL_OWN)
    balanced_accuracy: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    auc: Mapped[float | None] = mapped_column(Float)
    # The simulation scorer's predicted vs true activations; NULL for the other scorers.
    correlation: Mapped[float | None] = mapped_column(Float)
    n_examples: Mapped[int]
    n_parsed: Mapped[int]
    n_failed: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Prediction(Base):
    """One example's verdict within a score: the truth, what the model said, and its answer."""

    __tablename__ = "prediction"

    id: Mapped[int] = mapped_column(primary_key=True)
    score_id: Mapped[int] = mapped_column(ForeignKey("score.id", ondelete="CASCADE"), index=True)
    example_id: Mapped[int | None] = mapped_column(
        ForeignKey("example.id", ondelete="SET NULL"), index=True
    )
    label: Mapped[bool] = mapped_column(Boolean)
    predicted: Mapped[bool | None] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    raw: Mapped[str | None] = mapped_column(Text)


class LlmCall(Base):
    """One request to an LLM server: who served it, its size, its latency and any error."""

    __tablename__ = "llm_call"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL"), index=True
    )
    campaign_id: Mapped[int | None] = mapped_column(
        ForeignKey("campaign.id", ondelete="CASCADE"), index=True
    )
    stage: Mapped[str | None] = mapped_column(String(50))  # "explain" or the scorer's name
    model: Mapped[str] = mapped_column(String(200))
    base_url: Mapped[str] = mapped_column(String(500))
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    latency_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class Calibration(Base):
    """One `autointerp calibrate` run: the LLM it judged and the config it ran with."""

    __tablename__ = "calibration"

    id: Mapped[int] = mapped_column(primary_key=True)
    llm_model: Mapped[str | None] = mapped_column(String(200))
    subject_model: Mapped[str] = mapped_column(String(500))
    config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CalibrationScore(Base):
    """One scorer's score of one explanation on one planted latent of a calibration: the
    right explanation (the planted rule), a wrong one (another rule's) or an explainer's."""

    __tablename__ = "calibration_score"

    id: Mapped[int] = mapped_column(primary_key=True)
    calibration_id: Mapped[int] = mapped_column(
        ForeignKey("calibration.id", ondelete="CASCADE"), index=True
    )
    rule: Mapped[str] = mapped_column(String(100))
    scorer: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(100))
    explanation: Mapped[str] = mapped_column(Text)
    metric: Mapped[str] = mapped_column(String(50))
    value: Mapped[float | None] = mapped_column(Float)
    n_examples: Mapped[int]
    n_failed: Mapped[int]
