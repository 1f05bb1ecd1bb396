"""Sealed credentials for the vault.

Revision ID: 0003_credentials
Revises: 0002_runner_and_runs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_credentials"
down_revision: str | None = "0002_runner_and_runs"
branch_labels: str | None = None
depends_on: str | None = None

# Spelled out rather than imported from schema.py: a revision must keep creating what it
# created on the day it was written, whatever schema.py says later.
_SEALED = ("key_id", "dek_nonce", "wrapped_dek", "nonce", "ciphertext")
_SEALED_UNLESS_REVOKED = (
    "(revoked_at IS NULL AND "
    + " AND ".join(f"{c} IS NOT NULL" for c in _SEALED)
    + ") OR (revoked_at IS NOT NULL AND "
    + " AND ".join(f"{c} IS NULL" for c in _SEALED)
    + ")"
)


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("connection", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("key_id", sa.Text(), nullable=True),
        sa.Column("dek_nonce", sa.LargeBinary(), nullable=True),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=True),
        sa.Column("nonce", sa.LargeBinary(), nullable=True),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user", "connection", name=op.f("pk_credentials")),
        sa.CheckConstraint(
            "kind IN ('bearer', 'api_key', 'basic', 'oauth2')",
            name=op.f("ck_credentials_kind_known"),
        ),
        sa.CheckConstraint(
            _SEALED_UNLESS_REVOKED, name=op.f("ck_credentials_sealed_unless_revoked")
        ),
    )
    op.create_index(op.f("ix_credentials_key_id"), "credentials", ["key_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_credentials_key_id"), table_name="credentials")
    op.drop_table("credentials")
