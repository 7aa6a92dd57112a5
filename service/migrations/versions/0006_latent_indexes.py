"""Indexes for reading one latent at study scale: its windows of one cache version, and its
newest score per campaign and scorer, each answered from an index instead of a scan of every
window or score of the run.

The window index (cache_version_id, latent_id) replaces the one on cache_version_id alone,
which it covers; the score index (latent_id, campaign_id, scorer) replaces (latent_id, scorer).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("example") as batch:
        batch.drop_index("ix_example_cache_version_id")
        batch.create_index(
            "ix_example_cache_version_id_latent_id", ["cache_version_id", "latent_id"]
        )
    with op.batch_alter_table("score") as batch:
        batch.drop_index("ix_score_latent_id_scorer")
        batch.create_index(
            "ix_score_latent_id_campaign_id_scorer", ["latent_id", "campaign_id", "scorer"]
        )


def downgrade() -> None:
    with op.batch_alter_table("score") as batch:
        batch.drop_index("ix_score_latent_id_campaign_id_scorer")
        batch.create_index("ix_score_latent_id_scorer", ["latent_id", "scorer"])
    with op.batch_alter_table("example") as batch:
        batch.drop_index("ix_example_cache_version_id_latent_id")
        batch.create_index("ix_example_cache_version_id", ["cache_version_id"])
