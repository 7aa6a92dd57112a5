"""Scoring campaigns: a resolved score config plus the LLM that ran it, as a row that jobs,
explanations, scores and LLM calls point to. Jobs are keyed by campaign instead of by a hash
of their config; a latent has at most one explanation per explainer and campaign.

Results stored before this revision become one campaign per distinct job config, honestly
labelled: their LLM was never recorded (`llm` says so; `llm_model` is the model their
explanations name when that is one model) and their config is kept as it was stored (often
empty: such jobs ran whatever the defaults were at the time). Where a latent has several
explanations by one explainer in one of those campaigns, the newest keeps the campaign and
the older ones keep no campaign; nothing is deleted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEGACY_NOTE = "recorded before campaigns: the LLM and the resolved config were not stored"
JSON_TYPE = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def _legacy_campaigns(connection: sa.Connection) -> None:
    """One campaign per distinct config hash of the existing jobs."""
    configs = connection.execute(
        sa.text("SELECT config_hash, MIN(id) FROM job GROUP BY config_hash ORDER BY MIN(id)")
    ).all()
    for digest, first_job in configs:
        config = connection.execute(
            sa.text("SELECT config FROM job WHERE id = :id"), {"id": first_job}
        ).scalar()
        if isinstance(config, str):
            config = json.loads(config)
        models = connection.execute(
            sa.text(
                "SELECT DISTINCT e.model FROM explanation e JOIN job j ON j.id = e.job_id "
                "WHERE j.config_hash = :digest AND e.model <> e.explainer"
            ),
            {"digest": digest},
        ).scalars()
        named = sorted(models)
        key = hashlib.sha256(f"legacy:{digest}".encode()).hexdigest()
        connection.execute(
            sa.text(
                "INSERT INTO campaign (key, config, llm_backend, llm_model, llm, created_at) "
                "VALUES (:key, :config, NULL, :model, :llm, CURRENT_TIMESTAMP)"
            ).bindparams(
                sa.bindparam("config", type_=JSON_TYPE), sa.bindparam("llm", type_=JSON_TYPE)
            ),
            {
                "key": key,
                "config": config or {},
                "model": named[0] if len(named) == 1 else None,
                "llm": {"legacy": LEGACY_NOTE, "models_seen": named},
            },
        )
        campaign_id = connection.execute(
            sa.text("SELECT id FROM campaign WHERE key = :key"), {"key": key}
        ).scalar()
        connection.execute(
            sa.text("UPDATE job SET campaign_id = :campaign WHERE config_hash = :digest"),
            {"campaign": campaign_id, "digest": digest},
        )


def upgrade() -> None:
    op.create_table(
        "campaign",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("config", JSON_TYPE, nullable=False),
        sa.Column("llm_backend", sa.String(50), nullable=True),
        sa.Column("llm_model", sa.String(200), nullable=True),
        sa.Column("llm", JSON_TYPE, nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("key", name="uq_campaign_key"),
    )
    for table in ("job", "explanation", "score", "llm_call"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("campaign_id", sa.Integer(), nullable=True))
    connection = op.get_bind()
    _legacy_campaigns(connection)
    for table in ("score", "llm_call"):
        connection.execute(
            sa.text(
                f"UPDATE {table} SET campaign_id = "
                f"(SELECT j.campaign_id FROM job j WHERE j.id = {table}.job_id)"
            )
        )
    # The newest explanation per (campaign, latent, explainer) keeps its campaign.
    connection.execute(
        sa.text(
            "UPDATE explanation SET campaign_id = "
            "(SELECT j.campaign_id FROM job j WHERE j.id = explanation.job_id) "
            "WHERE explanation.id IN (SELECT MAX(e.id) FROM explanation e "
            "JOIN job j ON j.id = e.job_id GROUP BY j.campaign_id, e.latent_id, e.explainer)"
        )
    )
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint("uq_job_latent_id_stage_config_hash", type_="unique")
        batch.drop_column("config_hash")
        batch.drop_column("config")
        batch.alter_column("campaign_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(
            "fk_job_campaign_id_campaign", "campaign", ["campaign_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_unique_constraint(
            "uq_job_latent_id_stage_campaign_id", ["latent_id", "stage", "campaign_id"]
        )
        batch.create_index("ix_job_campaign_id", ["campaign_id"])
    with op.batch_alter_table("explanation") as batch:
        batch.drop_column("config_hash")
        batch.create_foreign_key(
            "fk_explanation_campaign_id_campaign",
            "campaign",
            ["campaign_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_unique_constraint(
            "uq_explanation_campaign_id_latent_id_explainer",
            ["campaign_id", "latent_id", "explainer"],
        )
        batch.create_index("ix_explanation_campaign_id", ["campaign_id"])
    for table in ("score", "llm_call"):
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_campaign_id_campaign",
                "campaign",
                ["campaign_id"],
                ["id"],
                ondelete="CASCADE",
            )
            batch.create_index(f"ix_{table}_campaign_id", ["campaign_id"])


def downgrade() -> None:
    """Back to jobs keyed by a config hash: each campaign's key stands in for it (so two
    campaigns of one config and two LLMs stay two jobs), its config goes back on the jobs."""
    for table in ("job", "explanation"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("config_hash", sa.String(64), nullable=True))
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("config", JSON_TYPE, nullable=True))
    connection = op.get_bind()
    connection.execute(
        sa.text(
            "UPDATE job SET "
            "config_hash = (SELECT substr(c.key, 1, 16) FROM campaign c "
            "WHERE c.id = job.campaign_id), "
            "config = (SELECT c.config FROM campaign c WHERE c.id = job.campaign_id)"
        )
    )
    connection.execute(
        sa.text(
            "UPDATE explanation SET config_hash = COALESCE("
            "(SELECT substr(c.key, 1, 16) FROM campaign c "
            "WHERE c.id = explanation.campaign_id), "
            "(SELECT j.config_hash FROM job j WHERE j.id = explanation.job_id), 'unknown')"
        )
    )
    with op.batch_alter_table("job") as batch:
        batch.drop_constraint("uq_job_latent_id_stage_campaign_id", type_="unique")
        batch.drop_index("ix_job_campaign_id")
        batch.drop_constraint("fk_job_campaign_id_campaign", type_="foreignkey")
        batch.drop_column("campaign_id")
        batch.alter_column("config_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("config", existing_type=JSON_TYPE, nullable=False)
        batch.create_unique_constraint(
            "uq_job_latent_id_stage_config_hash", ["latent_id", "stage", "config_hash"]
        )
    with op.batch_alter_table("explanation") as batch:
        batch.drop_constraint("uq_explanation_campaign_id_latent_id_explainer", type_="unique")
        batch.drop_index("ix_explanation_campaign_id")
        batch.drop_constraint("fk_explanation_campaign_id_campaign", type_="foreignkey")
        batch.drop_column("campaign_id")
        batch.alter_column("config_hash", existing_type=sa.String(64), nullable=False)
    for table in ("score", "llm_call"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_campaign_id")
            batch.drop_constraint(f"fk_{table}_campaign_id_campaign", type_="foreignkey")
            batch.drop_column("campaign_id")
    op.drop_table("campaign")
