"""Which step of a job each LLM call served: `explain`, or the scorer's name.

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


def upgrade() -> None:
    # Nullable: calls recorded before this revision did not say.
    with op.batch_alter_table("llm_call") as batch:
        batch.add_column(sa.Column("stage", sa.String(50), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("llm_call") as batch:
        batch.drop_column("stage")
