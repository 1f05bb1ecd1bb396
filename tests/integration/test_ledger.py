"""The credit ledger on both engines: exact amounts, refused bad ones, corrections, migration.

Amounts are integers of micro-credits (docs/design/ledger.md). Whatever the door (the
``Ledger``, the store's ``post``, plain SQL, the ``corral credits`` command), a NaN, an
infinity, a sign that does not fit the entry's kind, or more precision than a micro-credit
never reaches the table, and nothing already stored changes when one is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from corral.billing.amounts import MAX_CREDITS, to_micros
from corral.billing.ledger import Ledger
from corral.errors import BalanceLimit, InvalidInput
from corral.store import LedgerEntry, Store
from corral.store.engine import alembic_config, make_engine

HOSTILE = [
    "inf",
    "-inf",
    "nan",
    "NaN",
    "Infinity",
    "1e999",
    float("inf"),
    float("nan"),
    Decimal("NaN"),
    Decimal("Infinity"),
    "1e-7",
    0.0000001,
    "",
    "five",
    True,
    None,
]


@pytest.mark.parametrize("amount", HOSTILE, ids=repr)
def test_a_grant_must_be_a_finite_exact_positive_amount(store: Store, amount: Any) -> None:
    ledger = Ledger(store)
    ledger.grant("alice", 5)
    with pytest.raises(InvalidInput, match="a grant"):
        ledger.grant("alice", amount)
    assert ledger.balance("alice") == Decimal(5)
    assert len(store.ledger.entries(user="alice")) == 1


@pytest.mark.parametrize("amount", [0, -1, "-0.5", MAX_CREDITS + 1], ids=repr)
def test_a_grant_must_be_above_zero_and_within_the_bound(store: Store, amount: Any) -> None:
    with pytest.raises(InvalidInput, match="a grant"):
        Ledger(store).grant("alice", amount)
    assert store.ledger.entries(user="alice") == []


def test_balances_are_exact(store: Store) -> None:
    ledger = Ledger(store)
    ledger.grant("alice", 0.1)
    ledger.grant("alice", "0.2")
    assert ledger.balance("alice") == Decimal("0.3")  # 0.1 + 0.2 as floats is 0.30000000000000004
    ledger.grant("bob", "0.000001")
    assert ledger.balance("bob") == Decimal("0.000001") and ledger.balance("bob") > 0
    ledger.grant("carol", MAX_CREDITS)
    assert ledger.balance("carol") == MAX_CREDITS
    with pytest.raises(BalanceLimit, match="balance may be at most"):
        ledger.grant("carol", "0.000001")  # the bound that keeps every balance exact
    assert ledger.balance("carol") == MAX_CREDITS


def test_deductions_sum_exactly(store: Store) -> None:
    ledger = Ledger(store)
    ledger.grant("alice", 1)
    at = datetime.now(UTC)
    store.ledger.post(
        [
            LedgerEntry(
                user="alice",
                run="r1",
                app="a",
                source=f"call:{i}",
                kind="deduction",
                micros=-to_micros("0.0005"),
                detail=None,
                at=at,
            )
            for i in range(2000)
        ]
    )
    # 2000 x 0.0005 in floats sums to 0.9999999999999453; here it is exactly one credit.
    assert store.ledger.spent(run="r1") == 1_000_000
    assert ledger.balance("alice") == 0


@pytest.mark.parametrize(
    "kind, micros",
    [
        ("grant", 0),
        ("grant", -5),
        ("deduction", 5),
        ("adjustment", 0),
        ("grant", 1.5),
        ("grant", float("nan")),
        ("grant", True),
        ("grant", 10**16),
        ("bonus", 5),
    ],
)
def test_the_store_refuses_entries_that_do_not_fit(store: Store, kind: str, micros: Any) -> None:
    entry = LedgerEntry(
        user="alice",
        run=None,
        app=None,
        source="s",
        kind=kind,
        micros=micros,
        detail=None,
        at=datetime.now(UTC),
    )
    with pytest.raises(InvalidInput):
        store.ledger.post([entry])
    assert store.ledger.entries(user="alice") == []


@pytest.mark.parametrize(
    "kind, micros",
    [
        ("grant", 0),
        ("grant", -5),
        ("deduction", 5),
        ("voided", 3),
        ("adjustment", 0),
        ("grant", 10**15 + 1),
    ],
)
def test_the_database_itself_refuses_them(store_url: str, kind: str, micros: int) -> None:
    """Code that went around the ledger and the store still cannot write a bad entry."""
    engine = make_engine(store_url)
    try:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    'INSERT INTO ledger ("user", source, kind, micros, at) '
                    "VALUES ('alice', 's', :kind, :micros, CURRENT_TIMESTAMP)"
                ),
                {"kind": kind, "micros": micros},
            )
    finally:
        engine.dispose()


def test_a_correction_is_a_new_entry_of_either_sign(store: Store) -> None:
    ledger = Ledger(store)
    ledger.grant("alice", 1000, "meant 100")
    ledger.adjust("alice", -900, "typo: 1000 for 100")
    assert ledger.balance("alice") == 100
    ledger.adjust("alice", "0.5", "goodwill")
    assert ledger.balance("alice") == Decimal("100.5")
    kinds = [(e.kind, e.micros, e.detail) for e in store.ledger.entries(user="alice")]
    assert kinds == [
        ("grant", 1_000_000_000, "meant 100"),
        ("adjustment", -900_000_000, "typo: 1000 for 100"),
        ("adjustment", 500_000, "goodwill"),
    ]
    wrong: list[tuple[int | str, str, str]] = [
        (0, "x", "must not be zero"),
        ("nan", "x", "finite"),
        (-1, "", "needs a note"),
        (-1, "  ", "needs a note"),
    ]
    for amount, note, message in wrong:
        with pytest.raises(InvalidInput, match=message):
            ledger.adjust("alice", amount, note)
    assert len(store.ledger.entries(user="alice")) == 3


# -- the migration of existing float amounts ---------------------------------------------

LEGACY = [
    ("grant", 100.0, "grant", 100_000_000),
    ("deduction", -0.1, "deduction", -100_000),
    ("deduction", -0.0030000000000000001, "deduction", -3_000),
    ("deduction", -0.0, "deduction", 0),
    ("grant", float("inf"), "voided", 0),
    ("grant", -float("inf"), "voided", 0),
    ("grant", 1e300, "voided", 0),
    ("grant", -5.0, "adjustment", -5_000_000),
    ("grant", 1e-9, "voided", 0),
]


def test_migration_makes_float_amounts_exact_and_keeps_every_entry(blank_store_url: str) -> None:
    legacy = list(LEGACY)
    if blank_store_url.startswith("postgresql"):
        legacy.append(("grant", float("nan"), "voided", 0))  # SQLite stores no NaN at all
    engine = make_engine(blank_store_url)
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0006_triggers")
        with engine.begin() as conn:
            for i, (kind, value, _, _) in enumerate(legacy):
                conn.execute(
                    sa.text(
                        'INSERT INTO ledger ("user", source, kind, credits, detail, at) '
                        "VALUES ('alice', :source, :kind, :credits, 'note', :at)"
                    ),
                    {"source": f"s{i}", "kind": kind, "credits": value, "at": datetime.now(UTC)},
                )
    finally:
        engine.dispose()
    with Store.open(blank_store_url) as store:
        entries = store.ledger.entries(user="alice")
        assert [(e.kind, e.micros) for e in entries] == [(k, m) for _, _, k, m in legacy]
        for entry, (_, value, kind, _) in zip(entries, legacy, strict=True):
            if kind == "voided":
                assert json.loads(entry.detail or "") == {
                    "voided": f"revision 0007: credits was {value!r}",
                    "detail": "note",
                }
            else:
                assert entry.detail == "note"
        assert Ledger(store).balance("alice") == Decimal("94.897")


def test_migration_round_trips_on_downgrade(store_url: str) -> None:
    with Store.open(store_url) as store:
        Ledger(store).grant("alice", "12.5")
    engine = make_engine(store_url)
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0006_triggers")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT credits FROM ledger")).scalar() == 12.5
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    finally:
        engine.dispose()
    with Store.open(store_url) as store:
        assert Ledger(store).balance("alice") == Decimal("12.5")


# -- the CLI -----------------------------------------------------------------------------


def _cli(store_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(tmp_path / "data"),
        "CORRAL_DATABASE_URL": store_url,
    }
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", "credits", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_credits_command(store_url: str, tmp_path: Path) -> None:
    for amount in ("inf", "nan", "1e999", "-5", "0", "0.0000001", "ten"):
        refused = _cli(store_url, tmp_path, "grant", "alice", amount)
        assert refused.returncode == 2, refused.stderr
        assert repr(amount) in refused.stderr and "a grant" in refused.stderr
    granted = _cli(store_url, tmp_path, "grant", "alice", "1000")
    assert granted.stdout.strip() == "granted 1000 to alice; balance 1000"
    fixed = _cli(store_url, tmp_path, "adjust", "alice", "-899.75", "--note", "meant 100.25")
    assert fixed.stdout.strip() == "adjusted alice by -899.75; balance 100.25"
    assert _cli(store_url, tmp_path, "adjust", "alice", "-1").returncode == 2  # no --note
    shown = _cli(store_url, tmp_path, "balance", "alice", "--json")
    assert json.loads(shown.stdout) == {"user": "alice", "balance": 100.25}
    with Store.open(store_url) as store:
        assert len(store.ledger.entries(user="alice")) == 2
