"""The pipeline: apps and their versions, the run queue's columns, idempotency, the ledger.

Revision ID: 0005_pipeline
Revises: 0004_bridge
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_pipeline"
down_revision: str | None = "0004_bridge"
branch_labels: str | None = None
depends_on: str | None = None


def _run_columns() -> list[sa.Column[object]]:
    """Fresh Column objects each call: a Column belongs to one table once it is added."""
    return [
        sa.Column("user", sa.Text(), nullable=False, server_default="local"),
        sa.Column("app", sa.Text(), nullable=True),
        sa.Column("app_version", sa.Integer(), nullable=True),
        sa.Column("parent_run", sa.Text(), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("options", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    ]


def upgrade() -> None:
    # Plain ADD COLUMN (every new column is nullable or has a constant default): SQLite does it
    # in place, so no table copy holds the database while other processes wait to migrate.
    for column in _run_columns():
        op.add_column("runs", column)
    op.create_index("ix_runs_queue", "runs", ["status", "available_at"])
    op.create_table(
        "apps",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_apps")),
    )
    op.create_table(
        "app_versions",
        sa.Column("app", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app", "version", name=op.f("pk_app_versions")),
        sa.ForeignKeyConstraint(
            ["app"], ["apps.name"], name=op.f("fk_app_versions_app_apps"), ondelete="CASCADE"
        ),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("app", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user", "app", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("run", sa.Text(), nullable=True),
        sa.Column("app", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("credits", sa.Float(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger")),
        sa.UniqueConstraint("source", name=op.f("uq_ledger_source")),
    )


def downgrade() -> None:
    op.drop_table("ledger")
    op.drop_table("idempotency_keys")
    op.drop_table("app_versions")
    op.drop_table("apps")
    op.drop_index("ix_runs_queue", "runs")
    with op.batch_alter_table("runs") as batch:
        for column in reversed(_run_columns()):
            batch.drop_column(str(column.name))
