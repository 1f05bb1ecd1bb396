"""Workers announce themselves, so a caller can tell that no worker is running.

Revision ID: 0009_workers
Revises: 0008_budgets
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_workers"
down_revision: str | None = "0008_budgets"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
