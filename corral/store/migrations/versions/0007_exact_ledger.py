"""The ledger counts in integer micro-credits, never floats (docs/design/ledger.md).

Every existing float amount becomes micros through its shortest repr (0.1 stays exactly
0.1 credits), rounded half-even to the micro. Nothing is dropped: an amount that is not a
finite number (NaN or infinity, which the float column accepted) or beyond the ledger's
bound becomes a ``voided`` entry worth 0, its original value kept in ``detail``; an amount
whose sign contradicts its kind (a negative grant) becomes an ``adjustment``. Then the
checks that keep both out for good are added.

Revision ID: 0007_exact_ledger
Revises: 0006_triggers
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007_exact_ledger"
down_revision: str | None = "0006_triggers"
branch_labels: str | None = None
depends_on: str | None = None

# Spelled out rather than imported: a revision must keep meaning what it meant when written.
MICROS = 1_000_000
MAX_MICROS = 10**15
SIGNS = (
    "(kind = 'grant' AND micros > 0) OR (kind = 'deduction' AND micros <= 0)"
    " OR (kind = 'adjustment' AND micros <> 0) OR (kind = 'voided' AND micros = 0)"
)
BOUNDED = f"micros BETWEEN -{MAX_MICROS} AND {MAX_MICROS}"


def converted(kind: str, value: float | None, detail: str | None) -> tuple[str, int, str | None]:
    """(kind, micros, detail) for one legacy row."""
    if value is None or not math.isfinite(value):
        return "voided", 0, _voided(value, detail)
    micros = int((Decimal(repr(float(value))) * MICROS).to_integral_value(ROUND_HALF_EVEN))
    if abs(micros) > MAX_MICROS:
        return "voided", 0, _voided(value, detail)
    if (kind == "grant" and micros > 0) or (kind == "deduction" and micros <= 0):
        return kind, micros, detail
    if micros == 0:  # a zero grant, or an unknown kind worth nothing
        return "voided", 0, _voided(value, detail)
    return "adjustment", micros, detail


def _voided(value: float | None, detail: str | None) -> str:
    return json.dumps({"voided": f"revision 0007: credits was {value!r}", "detail": detail})


def upgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("micros", sa.BigInteger(), nullable=True))
    conn = op.get_bind()
    table = sa.table(
        "ledger",
        sa.column("id", sa.Integer()),
        sa.column("kind", sa.Text()),
        sa.column("credits", sa.Float()),
        sa.column("micros", sa.BigInteger()),
        sa.column("detail", sa.Text()),
    )
    rows = conn.execute(sa.select(table.c.id, table.c.kind, table.c.credits, table.c.detail))
    changes: list[dict[str, Any]] = []
    for row in rows.all():
        kind, micros, detail = converted(row.kind, row.credits, row.detail)
        changes.append({"row": row.id, "kind": kind, "micros": micros, "detail": detail})
    if changes:
        conn.execute(
            sa.update(table)
            .where(table.c.id == sa.bindparam("row"))
            .values(
                kind=sa.bindparam("kind"),
                micros=sa.bindparam("micros"),
                detail=sa.bindparam("detail"),
            ),
            changes,
        )
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("credits")
        batch.alter_column("micros", existing_type=sa.BigInteger(), nullable=False)
        batch.create_check_constraint("micros_by_kind", SIGNS)
        batch.create_check_constraint("micros_bounded", BOUNDED)


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:
        batch.drop_constraint(op.f("ck_ledger_micros_bounded"), type_="check")
        batch.drop_constraint(op.f("ck_ledger_micros_by_kind"), type_="check")
        batch.add_column(sa.Column("credits", sa.Float(), nullable=True))
    op.execute(f"UPDATE ledger SET credits = micros / {MICROS}.0")
    with op.batch_alter_table("ledger") as batch:
        batch.alter_column("credits", existing_type=sa.Float(), nullable=False)
        batch.drop_column("micros")
