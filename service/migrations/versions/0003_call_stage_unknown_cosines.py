"""Which step of a job each LLM call served (`explain`, or the scorer's name); matched
cosines that may be unknown (NULL): a latent whose direction is zero or not finite has no
partner, and a pair of SAEs all of whose latents are so has no mean cosine.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


COSINES = {
    "match": ("cos_decoder", "cos_encoder"),
    "match_pair": ("mean_cos_decoder", "mean_cos_encoder"),
}


def upgrade() -> None:
    # Nullable: calls recorded before this revision did not say.
    with op.batch_alter_table("llm_call") as batch:
        batch.add_column(sa.Column("stage", sa.String(50), nullable=True))
    for table, columns in COSINES.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    for table, columns in COSINES.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, existing_type=sa.Float(), nullable=False)
    with op.batch_alter_table("llm_call") as batch:
        batch.drop_column("stage")
