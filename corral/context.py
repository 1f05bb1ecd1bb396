"""Wiring: the one place that builds Corral's components from Settings and hands them around."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from corral.billing.ledger import Ledger
from corral.bridge.backend import StoreBackend
from corral.bridge.gate import BridgeGate, Sink
from corral.bridge.server import Bridge
from corral.bridge.tokens import KEY_KEPT_FOR, ROTATE_AFTER, SigningKeyRing, TokenIssuer, Verifier
from corral.config import Settings
from corral.envs.service import Environments
from corral.errors import BridgeUnavailable
from corral.observability.metrics import Metrics
from corral.observability.traces import Tracing
from corral.pipeline.apps import AdHoc, Apps
from corral.pipeline.executor import Executor
from corral.pipeline.service import Pipeline, Trigger
from corral.pipeline.webhooks import Deliverer, RetryPolicy, Webhooks
from corral.pipeline.worker import STOP_GRACE_S, Worker, execute_now, recover_expired
from corral.releases.service import ReleaseService
from corral.sandbox.runc_runtime import RuncRuntime
from corral.sandbox.runtime import Runtime
from corral.store import Run, RunEvent, Store
from corral.triggers.scheduler import Scheduler
from corral.vault import MasterKeys, Vault
from corral.vault.signing import SealedSigningKeys


@dataclass
class Corral:
    settings: Settings
    # The sandbox runtime: runc, unless a test of the logic above it hands in another
    # (``corral.sandbox.testing.UnsandboxedRuntime``). Building one touches nothing on the
    # host; ``sandboxes()`` prepares the host.
    sandbox_runtime: InitVar[Runtime | None] = None
    runtime: Runtime = field(init=False)
    # How many dead owners' sandboxes this process reaped when it prepared the host.
    reaped_at_start: int | None = field(default=None, init=False)
    _bridge: Bridge | None = field(default=None, init=False)
    _bridge_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    _bridge_elsewhere: bool = field(default=False, init=False)
    _workers: list[Worker] = field(default_factory=list, init=False)
    _deliverer: Deliverer | None = field(default=None, init=False)
    # Guards the first sandboxes() call: the HTTP API calls it from many threads at once.
    _sandboxes_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self, sandbox_runtime: Runtime | None) -> None:
        self.runtime = sandbox_runtime or RuncRuntime(self.settings)

    @classmethod
    def from_env(cls) -> Corral:
        return cls(Settings.from_env())

    @cached_property
    def store(self) -> Store:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        return Store.open(self.settings.database_url)

    def sandboxes(self) -> Runtime:
        """The runtime, its host prepared on first use (checked, the network's anchor and
        nftables table installed, what a crash left behind reaped): only what boots a
        sandbox calls this, so a host that cannot run sandboxes still serves the rest."""
        with self._sandboxes_lock:
            if self.reaped_at_start is None:
                self.reaped_at_start = self.runtime.prepare()
            return self.runtime

    @cached_property
    def envs(self) -> Environments:
        return Environments(
            self.settings, self.store, self.sandboxes, attrs=self.runtime.immutability
        )

    @cached_property
    def releases(self) -> ReleaseService:
        return ReleaseService(self.store, self.envs.layout)

    @cached_property
    def vault(self) -> Vault:
        """Host-side only: the bridge resolves credentials through it; no sandbox ever may.
        It seals the bridge's signing keys too, under the same master keys."""
        keys = MasterKeys.from_settings(self.settings)
        kept_for = timedelta(seconds=KEY_KEPT_FOR)
        return Vault(
            self.store.credentials, keys, SealedSigningKeys(self.store.signing_keys, keys, kept_for)
        )

    @cached_property
    def signing_keys(self) -> SigningKeyRing:
        return SigningKeyRing(ROTATE_AFTER, store=self.vault.signing_keys)

    @cached_property
    def verifier(self) -> Verifier:
        return Verifier(self.signing_keys)

    def bridge(self) -> Bridge | None:
        """Serve the bridge from this process unless another Corral process already does.

        Returns the bridge this process serves, or None if another process holds the port
        (every bridge decides from the same store, so any of them will do).
        """
        with self._bridge_lock:
            if self._bridge is None and not self._bridge_elsewhere:
                self.sandboxes()  # the gateway address must exist before we can listen on it
                net = self.settings.network
                backend = StoreBackend(self.store, self.vault)
                # Agent-to-agent calls start runs through the pipeline (``AgentCalls``).
                gate = BridgeGate(
                    net.subnet, self.verifier, backend, Sink(backend), agents=self.pipeline
                )
                try:
                    self._bridge = Bridge(gate, str(net.gateway), net.bridge_port).start()
                except BridgeUnavailable:
                    gate.sink.close()
                    self._bridge_elsewhere = True
            return self._bridge

    @cached_property
    def executor(self) -> Executor:
        return Executor(
            self.settings,
            self.store,
            self.envs,
            self.releases,
            self.sandboxes,
            tokens=TokenIssuer(self.signing_keys, self.verifier),
            bridge=self.bridge,
        )

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.store)

    @cached_property
    def pipeline(self) -> Pipeline:
        pipeline = Pipeline(self.store, self.executor, self.ledger)
        pipeline.on_admitted.append(self.metrics.changed)  # its next scrape sees it
        return pipeline

    @cached_property
    def metrics(self) -> Metrics:
        return Metrics(self.store)

    @cached_property
    def tracing(self) -> Tracing:
        return Tracing(self.store)

    def scheduler(self, name: str | None = None) -> Scheduler:
        """A cron scheduler firing due schedules through this process's pipeline. Not started:
        the caller owns ``start()`` and ``stop()``; any number may run against one database."""
        return Scheduler(self.store, self.pipeline, name)

    @cached_property
    def webhooks(self) -> Webhooks:
        return Webhooks(self.store, Apps(self.store))

    def start_workers(
        self, count: int = 2, *, webhook_policy: RetryPolicy | None = None, **options: Any
    ) -> list[Worker]:
        """Worker threads in this process, leasing runs from the shared queue, and (once per
        process) the thread that delivers the webhooks of finished runs. From then on, every
        run this process ends is announced here: traces, webhooks."""
        self.bridge()
        self._announce_finished_runs()
        options.setdefault("lease", self.settings.run_lease)
        workers = [Worker(self.pipeline, self.sandboxes, **options).start() for _ in range(count)]
        self._workers.extend(workers)
        if self._deliverer is not None and webhook_policy is not None:
            self._deliverer.stop()  # a new policy: replace the running deliverer
            self._deliverer = None
        if self._deliverer is None:
            self._deliverer = Deliverer(self.webhooks, policy=webhook_policy).start()
        return workers

    def execute_here(
        self,
        run: Run,
        wait_timeout: float | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
    ) -> Run:
        """Execute the queued ``run`` in this thread, now (``corral app run --here``, ``corral
        run``), as a worker would, telling ``on_event`` each event as it is recorded. If a
        worker elsewhere took it first, follow that one's execution instead."""
        self.bridge()
        self._announce_finished_runs()
        return execute_now(
            self.pipeline,
            self.sandboxes,
            run,
            lease=self.settings.run_lease,
            wait_timeout=wait_timeout,
            on_event=on_event,
        )

    def run_here(
        self,
        spec: AdHoc,
        input: Any,
        *,
        user: str,
        on_event: Callable[[RunEvent], None] | None = None,
    ) -> Run:
        """``corral run``: admit an ad-hoc run of ``spec`` as the local operator (trigger
        ``cli``; never refused for credits, still billed), then execute it here, now."""
        # Like every start, first end what a dead `corral run` or worker left running.
        recover_expired(self.pipeline, self.sandboxes, self.settings.run_lease)
        run = self.pipeline.execute_agent(spec, input, Trigger("cli"), user=user, operator=True)
        return self.execute_here(run, on_event=on_event)

    def _announce_finished_runs(self) -> None:
        """From now on, every run this process ends is announced: traces, webhooks (metrics
        are read from the store; this drops this process's cached figures)."""
        if not self.pipeline.on_finished:
            self.pipeline.on_finished += [
                self.metrics.changed,
                self.tracing.finished_run,
                self.webhooks.on_finished,
            ]

    def stop_workers(self, grace: float = STOP_GRACE_S) -> None:
        """Stop this process's workers and its webhook deliverer. The workers take no more runs
        at once; runs still in hand after ``grace`` seconds go back to the queue, their
        sandboxes torn down."""
        for worker in self._workers:
            worker.drain()
        deadline = time.monotonic() + grace
        for worker in self._workers:
            worker.join(deadline)
        self._workers.clear()
        if self._deliverer is not None:
            self._deliverer.stop()
            self._deliverer = None

    def close(self) -> None:
        self.stop_workers()
        if self._bridge is not None:
            self._bridge.stop()
            self._bridge = None
        if "store" in self.__dict__:
            self.store.close()
