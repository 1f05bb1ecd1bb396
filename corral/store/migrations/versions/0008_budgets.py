"""Run trees and announcements: ``root_run``, ``awaited``, ``announced_at`` on runs.

``root_run`` names the run that started a run's call tree (its own id for a tree's root), so
the cost of a whole tree is one indexed query. ``awaited`` marks a callee whose caller is
blocked waiting on it: the caller's worker lends it its capacity. ``announced_at`` records that
a finished run's completion hooks (metrics, traces, webhooks) have been fired, once.

Revision ID: 0008_budgets
Revises: 0007_exact_ledger
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_budgets"
down_revision: str | None = "0007_exact_ledger"
branch_labels: str | None = None
depends_on: str | None = None

TERMINAL = "('succeeded', 'failed', 'timed_out', 'cancelled')"


def upgrade() -> None:
    # Plain ADD COLUMN (nullable or a constant default): SQLite does it in place.
    op.add_column("runs", sa.Column("root_run", sa.Text(), nullable=True))
    op.add_column(
        "runs", sa.Column("awaited", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("runs", sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_runs_root_run", "runs", ["root_run"])
    op.create_index("ix_runs_parent_run", "runs", ["parent_run", "status"])
    op.create_index("ix_runs_announced_at", "runs", ["announced_at", "status"])
    # Existing trees: a root is its own root; each level below takes its parent's.
    # (A run whose parent is gone stays NULL, which the code reads as a root of its own.)
    bind = op.get_bind()
    bind.execute(sa.text("UPDATE runs SET root_run = id WHERE parent_run IS NULL"))
    while bind.execute(
        sa.text(
            "UPDATE runs SET root_run ="
            " (SELECT p.root_run FROM runs AS p WHERE p.id = runs.parent_run)"
            " WHERE root_run IS NULL AND EXISTS (SELECT 1 FROM runs AS p"
            " WHERE p.id = runs.parent_run AND p.root_run IS NOT NULL)"
        )
    ).rowcount:
        pass
    # What ended before this revision was announced by the code of its day.
    op.execute(f"UPDATE runs SET announced_at = finished_at WHERE status IN {TERMINAL}")


def downgrade() -> None:
    op.drop_index("ix_runs_announced_at", "runs")
    op.drop_index("ix_runs_parent_run", "runs")
    op.drop_index("ix_runs_root_run", "runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("announced_at")
        batch.drop_column("awaited")
        batch.drop_column("root_run")
