"""Fixtures of the unit tests that drive Corral's logic end to end without root.

``corral``: one Corral per module on the unsandboxed runtime (``unsandboxed.py``), with the
environment ``analyst`` holding ``unsandboxed.AGENT``. Tests share it and keep out of each
other's way by name: ``app`` makes an app of their own, ``user`` a user with credits.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral.context import Corral
from corral.pipeline.apps import AppSpec
from tests.unit.unsandboxed import unsandboxed_corral

ENV = "analyst"


@pytest.fixture(scope="module")
def corral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corral]:
    corral = unsandboxed_corral(tmp_path_factory.mktemp("corral"))
    corral.envs.create(ENV)
    yield corral
    corral.close()


@pytest.fixture
def app(corral: Corral) -> Callable[..., str]:
    """``app(entrypoint="agent.py:main", **spec)``: a new app on ``analyst``; its name."""

    def make(entrypoint: str = "agent.py:main", **spec: Any) -> str:
        name = f"app-{secrets.token_hex(4)}"
        corral.pipeline.apps.create(name, AppSpec(ENV, entrypoint, **spec))
        return name

    return make


@pytest.fixture
def user(corral: Corral) -> str:
    """A user of this test alone, granted 100 credits."""
    name = f"user-{secrets.token_hex(4)}"
    corral.ledger.grant(name, 100)
    return name
