"""Apps: a frozen environment, an entrypoint and its settings. Every change is a new version.

A run records the app version it ran, so what ran is always known even after the app moved on.
An ad-hoc run (``corral run ENV FILE:FN``) has no app: ``AdHoc`` says once what an app's
version would say, and the run records it (``options``) in place of a version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from corral.billing.amounts import to_micros
from corral.errors import InvalidInput
from corral.store import Store
from corral.store.rows import check_name

POLICIES = ("allow", "enqueue", "reject", "cancel_previous")


@dataclass(frozen=True)
class AppSpec:
    environment: str
    entrypoint: str  # "agent.py:main"
    timeout: float = 600.0  # seconds a run may take
    budget_per_run: float | None = None  # credits; a run that spends it is stopped
    budget_total: float | None = None  # credits across all the app's runs
    concurrency: str = "allow"  # allow | enqueue | reject | cancel_previous, per user
    max_concurrent: int = 0  # 0: no maximum
    connections: tuple[str, ...] = ()  # what its runs' tokens may reach
    input_schema: dict[str, Any] | None = None  # JSON Schema for the input
    webhook_url: str | None = None  # POSTed, HMAC-signed, when a run ends
    webhook_secret: str | None = None
    callable_by_agents: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.environment)
        if ":" not in self.entrypoint:
            raise InvalidInput(
                f"entrypoint {self.entrypoint!r} is not of the form file.py:function"
            )
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise InvalidInput(f"timeout must be a number of seconds, not {self.timeout!r}")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise InvalidInput(
                f"timeout must be a finite number of seconds above 0, not {self.timeout!r}"
            )
        if self.concurrency not in POLICIES:
            raise InvalidInput(f"concurrency must be one of {', '.join(POLICIES)}")
        if self.max_concurrent < 0:
            raise InvalidInput("max_concurrent must be 0 (no maximum) or more")
        for what in ("budget_per_run", "budget_total"):
            budget = getattr(self, what)
            if budget is not None and (
                isinstance(budget, bool) or not isinstance(budget, int | float)
            ):
                raise InvalidInput(f"{what} must be a number of credits, not {budget!r}")
            # Exact, finite and within the ledger's bound, like every amount of credits.
            if budget is not None and to_micros(budget, what) < 0:
                raise InvalidInput(f"{what} cannot be negative, not {budget!r}")
        if self.input_schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(self.input_schema)
            except jsonschema.SchemaError as exc:
                raise InvalidInput(f"input_schema is not a JSON Schema: {exc.message}") from None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["connections"] = list(self.connections)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AppSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InvalidInput(f"unknown app settings: {', '.join(sorted(unknown))}")
        values = dict(raw)
        values["connections"] = tuple(values.get("connections", ()))
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidInput(f"app settings are incomplete: {exc}") from None

    def check_input(self, value: Any) -> None:
        if self.input_schema is None:
            return
        try:
            jsonschema.validate(value, self.input_schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(the input)"
            raise InvalidInput(f"input fails the app's schema at {where}: {exc.message}") from None


@dataclass(frozen=True)
class AdHoc:
    """What an app-less run executes (``corral run``): any environment and entrypoint, which
    is why only the local operator runs one. No schema, budget or concurrency policy: those
    are an app's; the run is still admitted, billed, metered and traced like an app's."""

    environment: str
    entrypoint: str  # "agent.py:main"
    snapshot: str | None = None  # a snapshot of the history; default the head
    timeout: float | None = None  # seconds for the whole run; default CORRAL_SANDBOX_TIMEOUT
    connections: tuple[str, ...] = ()  # what its token may reach

    def __post_init__(self) -> None:
        # The entrypoint's form is left to the runner, which fails the run ``bad_entrypoint``
        # naming the form: an operator's experiment, not an app someone else will call.
        check_name(self.environment)
        if self.timeout is not None and not (
            isinstance(self.timeout, int | float)
            and not isinstance(self.timeout, bool)
            and math.isfinite(self.timeout)
            and self.timeout > 0
        ):
            raise InvalidInput(
                f"timeout must be a finite number of seconds above 0, not {self.timeout!r}"
            )

    def options(self) -> dict[str, Any]:
        """What the run records of it (``runs.options``), for whoever executes it."""
        return {"timeout": self.timeout, "connections": list(self.connections)}


class Apps:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, spec: AppSpec) -> tuple[int, AppSpec]:
        check_name(name)
        self.store.environments.get(spec.environment)
        return self.store.apps.create(name, spec.to_json()), spec

    def update(self, name: str, **changes: Any) -> tuple[int, AppSpec]:
        _, current = self.get(name)
        raw = current.to_json()
        raw.update(changes)
        spec = AppSpec.from_json(raw)
        self.store.environments.get(spec.environment)
        return self.store.apps.update(name, spec.to_json()), spec

    def get(self, name: str, version: int | None = None) -> tuple[int, AppSpec]:
        found = self.store.apps.get(name, version)
        return found.version, AppSpec.from_json(found.spec)

    def all(self) -> list[tuple[str, int, AppSpec]]:
        return [(a.name, a.version, AppSpec.from_json(a.spec)) for a in self.store.apps.all()]
