"""Initial schema: environments and their snapshots.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Constraint names are spelled out in full (op.f) so they do not depend on the naming
    # convention in schema.py, which Alembic would otherwise apply a second time.
    op.create_table(
        "environments",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("base", sa.Text(), nullable=False),
        sa.Column("head", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_environments")),
        sa.CheckConstraint(
            "length(name) BETWEEN 1 AND 63", name=op.f("ck_environments_name_length")
        ),
    )
    op.create_table(
        "snapshots",
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("environment", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("parent", sa.Text(), nullable=True),
        sa.Column("layer", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("digest", "environment", name=op.f("pk_snapshots")),
        sa.ForeignKeyConstraint(
            ["environment"],
            ["environments.name"],
            name=op.f("fk_snapshots_environment_environments"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("environment", "seq", name=op.f("uq_snapshots_environment_seq")),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_snapshots_seq_positive")),
        sa.CheckConstraint("size >= 0", name=op.f("ck_snapshots_size_not_negative")),
    )


def downgrade() -> None:
    op.drop_table("snapshots")
    op.drop_table("environments")
