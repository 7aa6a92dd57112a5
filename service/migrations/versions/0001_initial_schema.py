"""Initial schema: runs, SAEs, latents, matches, examples, the job queue and results.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.Integer(), nullable=False)


def _fk(column: str, table: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=f"fk_{table}_{column}_{target}", ondelete=ondelete
    )


def upgrade() -> None:
    op.create_table(
        "run",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("subject_model", sa.String(500), nullable=False),
        sa.Column("hookpoint", sa.String(200), nullable=False),
        sa.Column("dataset", sa.String(500), nullable=False),
        sa.Column("architecture", sa.String(50), nullable=False),
        sa.Column("n_latents", sa.Integer(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=True),
        sa.Column("seeds", JSON, nullable=False),
        sa.Column("path", sa.String(1000), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_run"),
        sa.UniqueConstraint("name", name="uq_run_name"),
    )
    op.create_table(
        "sae",
        _id(),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("hookpoint", sa.String(200), nullable=False),
        sa.Column("path", sa.String(1000), nullable=True),
        sa.Column("n_latents", sa.Integer(), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("architecture", sa.String(50), nullable=False),
        sa.Column("k", sa.Integer(), nullable=True),
        sa.Column("fvu", sa.Float(), nullable=True),
        sa.Column("l0", sa.Float(), nullable=True),
        sa.Column("dead_fraction", sa.Float(), nullable=True),
        _fk("run_id", "sae", "run", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_sae"),
        sa.UniqueConstraint("run_id", "hookpoint", "seed", name="uq_sae_run_id_hookpoint_seed"),
    )
    op.create_index("ix_sae_run_id", "sae", ["run_id"])
    op.create_table(
        "latent",
        _id(),
        sa.Column("sae_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("firing_count", sa.Integer(), nullable=True),
        sa.Column("firing_frequency", sa.Float(), nullable=True),
        sa.Column("max_activation", sa.Float(), nullable=True),
        _fk("sae_id", "latent", "sae", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_latent"),
        sa.UniqueConstraint("sae_id", "index", name="uq_latent_sae_id_index"),
    )
    op.create_table(
        "match_pair",
        _id(),
        sa.Column("sae_a_id", sa.Integer(), nullable=False),
        sa.Column("sae_b_id", sa.Integer(), nullable=False),
        sa.Column("solver", sa.String(50), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("n_latents", sa.Integer(), nullable=False),
        sa.Column("shared_fraction", sa.Float(), nullable=False),
        sa.Column("shared_fraction_decoder_only", sa.Float(), nullable=False),
        sa.Column("encoder_decoder_agreement", sa.Float(), nullable=False),
        sa.Column("mean_cos_decoder", sa.Float(), nullable=False),
        sa.Column("mean_cos_encoder", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        _fk("sae_a_id", "match_pair", "sae", "CASCADE"),
        _fk("sae_b_id", "match_pair", "sae", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_match_pair"),
        sa.UniqueConstraint("sae_a_id", "sae_b_id", name="uq_match_pair_sae_a_id_sae_b_id"),
    )
    op.create_index("ix_match_pair_sae_b_id", "match_pair", ["sae_b_id"])
    op.create_table(
        "match",
        _id(),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("latent_index_a", sa.Integer(), nullable=False),
        sa.Column("partner_decoder", sa.Integer(), nullable=False),
        sa.Column("cos_decoder", sa.Float(), nullable=False),
        sa.Column("partner_encoder", sa.Integer(), nullable=False),
        sa.Column("cos_encoder", sa.Float(), nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("agree", sa.Boolean(), nullable=False),
        _fk("pair_id", "match", "match_pair", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_match"),
        sa.UniqueConstraint("pair_id", "latent_index_a", name="uq_match_pair_id_latent_index_a"),
    )
    op.create_index("ix_match_pair_id_shared", "match", ["pair_id", "shared"])
    op.create_table(
        "example",
        _id(),
        sa.Column("latent_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("quantile_bin", sa.Integer(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("activations", sa.LargeBinary(), nullable=False),
        sa.Column("max_activation", sa.Float(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        _fk("latent_id", "example", "latent", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_example"),
    )
    op.create_index("ix_example_latent_id_kind", "example", ["latent_id", "kind"])
    op.create_table(
        "job",
        _id(),
        sa.Column("latent_id", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(50), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        _fk("latent_id", "job", "latent", "CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_job"),
        sa.UniqueConstraint(
            "latent_id", "stage", "config_hash", name="uq_job_latent_id_stage_config_hash"
        ),
    )
    op.create_index("ix_job_state_stage", "job", ["state", "stage"])
    op.create_index("ix_job_finished_at", "job", ["finished_at"])
    op.create_table(
        "explanation",
        _id(),
        sa.Column("latent_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("explainer", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("raw", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("latent_id", "explanation", "latent", "CASCADE"),
        _fk("job_id", "explanation", "job", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_explanation"),
    )
    op.create_index("ix_explanation_latent_id", "explanation", ["latent_id"])
    op.create_index("ix_explanation_job_id", "explanation", ["job_id"])
    op.create_table(
        "score",
        _id(),
        sa.Column("latent_id", sa.Integer(), nullable=False),
        sa.Column("explanation_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("scorer", sa.String(100), nullable=False),
        sa.Column("control", sa.String(50), nullable=False),
        sa.Column("balanced_accuracy", sa.Float(), nullable=True),
        sa.Column("f1", sa.Float(), nullable=True),
        sa.Column("auc", sa.Float(), nullable=True),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("n_parsed", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("latent_id", "score", "latent", "CASCADE"),
        _fk("explanation_id", "score", "explanation", "CASCADE"),
        _fk("job_id", "score", "job", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_score"),
    )
    op.create_index("ix_score_latent_id_scorer", "score", ["latent_id", "scorer"])
    op.create_index("ix_score_explanation_id", "score", ["explanation_id"])
    op.create_index("ix_score_job_id", "score", ["job_id"])
    op.create_table(
        "prediction",
        _id(),
        sa.Column("score_id", sa.Integer(), nullable=False),
        sa.Column("example_id", sa.Integer(), nullable=True),
        sa.Column("label", sa.Boolean(), nullable=False),
        sa.Column("predicted", sa.Boolean(), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("raw", sa.Text(), nullable=True),
        _fk("score_id", "prediction", "score", "CASCADE"),
        _fk("example_id", "prediction", "example", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_prediction"),
    )
    op.create_index("ix_prediction_score_id", "prediction", ["score_id"])
    op.create_index("ix_prediction_example_id", "prediction", ["example_id"])
    op.create_table(
        "llm_call",
        _id(),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("base_url", sa.String(500), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        _fk("job_id", "llm_call", "job", "SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_llm_call"),
    )
    op.create_index("ix_llm_call_job_id", "llm_call", ["job_id"])
    op.create_index("ix_llm_call_created_at", "llm_call", ["created_at"])


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes with it.
    for table in (
        "llm_call",
        "prediction",
        "score",
        "explanation",
        "job",
        "example",
        "match",
        "match_pair",
        "latent",
        "sae",
        "run",
    ):
        op.drop_table(table)
