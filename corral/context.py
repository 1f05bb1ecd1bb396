"""Wiring: the one place that builds Corral's components from Settings and hands them around."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property

from corral.config import Settings
from corral.envs.service import Environments
from corral.pipeline.executor import Executor
from corral.releases.service import ReleaseService
from corral.sandbox.sandboxes import Sandboxes
from corral.store import Store


@dataclass
class Corral:
    settings: Settings
    _sandboxes: Sandboxes | None = field(default=None, init=False)
    # Guards the first sandboxes() call: the HTTP API calls it from many threads at once.
    _sandboxes_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    @classmethod
    def from_env(cls) -> Corral:
        return cls(Settings.from_env())

    @cached_property
    def store(self) -> Store:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return Store.open(self.settings.database_url)

    def sandboxes(self) -> Sandboxes:
        """Built on first use: it checks the host and reaps what a crash left behind."""
        with self._sandboxes_lock:
            if self._sandboxes is None:
                self._sandboxes = Sandboxes(self.settings)
            return self._sandboxes

    @cached_property
    def envs(self) -> Environments:
        return Environments(self.settings, self.store, self.sandboxes)

    @cached_property
    def releases(self) -> ReleaseService:
        return ReleaseService(self.store, self.envs.layout)

    @cached_property
    def executor(self) -> Executor:
        return Executor(self.settings, self.store, self.envs, self.releases, self.sandboxes)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()
