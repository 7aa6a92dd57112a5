"""Cached windows versioned by cache config: a `cache_version` per `cache` of a run under
one resolved config, and every example window pointing to the version that wrote it.

Windows stored before this revision go into version 1 of their run with config and hash
NULL: the config they were cached with was not recorded. Downgrading keeps only each run's
newest complete version (the one readers use), since the old schema holds one set per run.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "cache_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("config", JSON, nullable=True),
        sa.Column("config_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name="fk_cache_version_run_id_run", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_cache_version"),
        sa.UniqueConstraint("run_id", "version", name="uq_cache_version_run_id_version"),
    )
    op.create_index("ix_cache_version_run_id", "cache_version", ["run_id"])
    now = datetime.now(UTC).replace(tzinfo=None)
    op.execute(
        sa.text(
            "INSERT INTO cache_version (run_id, version, created_at, completed_at) "
            "SELECT DISTINCT sae.run_id, 1, :now, :now FROM example "
            "JOIN latent ON latent.id = example.latent_id JOIN sae ON sae.id = latent.sae_id"
        ).bindparams(now=now)
    )
    with op.batch_alter_table("example") as batch:
        batch.add_column(sa.Column("cache_version_id", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE example SET cache_version_id = (SELECT cache_version.id FROM cache_version "
        "JOIN sae ON sae.run_id = cache_version.run_id JOIN latent ON latent.sae_id = sae.id "
        "WHERE latent.id = example.latent_id AND cache_version.version = 1)"
    )
    with op.batch_alter_table("example") as batch:
        batch.alter_column("cache_version_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(
            "fk_example_cache_version_id_cache_version",
            "cache_version",
            ["cache_version_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_index("ix_example_cache_version_id", ["cache_version_id"])


def downgrade() -> None:
    newest = (
        "SELECT MAX(cache_version.id) FROM cache_version "
        "WHERE cache_version.completed_at IS NOT NULL GROUP BY cache_version.run_id"
    )
    dropped = f"SELECT id FROM example WHERE cache_version_id NOT IN ({newest})"
    op.execute(f"UPDATE prediction SET example_id = NULL WHERE example_id IN ({dropped})")
    op.execute(f"DELETE FROM example WHERE cache_version_id NOT IN ({newest})")
    with op.batch_alter_table("example") as batch:
        batch.drop_index("ix_example_cache_version_id")
        batch.drop_constraint("fk_example_cache_version_id_cache_version", type_="foreignkey")
        batch.drop_column("cache_version_id")
    op.drop_index("ix_cache_version_run_id", "cache_version")
    op.drop_table("cache_version")
