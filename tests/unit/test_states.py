"""The run states module: its drawing is its table, and an ended run has no way out."""

from __future__ import annotations

import re

import pytest

from corral import states
from corral.states import ACTIVE, INITIAL, TERMINAL, TRANSITIONS, RunStatus, allowed, sources

ARROW = re.compile(r"^\s*(\[\*\]|\w+) --> (\w+):", re.MULTILINE)


def drawn() -> tuple[set[str], set[tuple[str, str]]]:
    """The initial states and the arrows of the module docstring's state diagram."""
    initial, arrows = set(), set()
    for source, target in ARROW.findall(states.__doc__ or ""):
        if source == "[*]":
            initial.add(target)
        else:
            arrows.add((source, target))
    return initial, arrows


def test_the_drawing_and_the_table_are_the_same_machine() -> None:
    initial, arrows = drawn()
    assert arrows, "the docstring lost its diagram"
    table = {(str(a), str(b)) for a, targets in TRANSITIONS.items() for b in targets}
    assert arrows == table
    assert initial == {str(s) for s in INITIAL}


def test_every_state_is_active_or_terminal_and_an_ended_run_stays_ended() -> None:
    assert set(ACTIVE) | set(TERMINAL) == set(RunStatus)
    assert not set(ACTIVE) & set(TERMINAL)
    for status in RunStatus:
        assert status.terminal == (status in TERMINAL)
    for ended in TERMINAL:
        assert TRANSITIONS[ended] == frozenset()
        assert not any(allowed(ended, target) for target in RunStatus)


def test_sources_are_what_the_store_builds_its_conditions_from() -> None:
    assert sources("running") == (RunStatus.QUEUED,)  # claim
    assert sources("queued") == (RunStatus.RUNNING,)  # requeue, hand back, release
    assert sources("cancelled") == (RunStatus.QUEUED, RunStatus.RUNNING)
    for ended in ("succeeded", "failed", "timed_out"):
        assert sources(ended) == (RunStatus.RUNNING,)
    assert sources("cancelled", among=("queued",)) == (RunStatus.QUEUED,)
    assert sources("succeeded", among=("queued",)) == ()
    assert allowed("queued", "running") and not allowed("queued", "succeeded")


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="'paused'"):
        sources("paused")
    with pytest.raises(ValueError, match="'paused'"):
        allowed("queued", "paused")
