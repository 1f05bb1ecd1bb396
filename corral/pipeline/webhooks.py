"""Webhooks: a signed POST to an app's ``webhook_url`` once each of its runs has ended.

Enqueueing. ``Webhooks.on_finished`` is a completion hook (``Pipeline.on_finished``, fired
once for every run that ends, whatever ended it): for a finished run of an app version with
a ``webhook_url`` it records one delivery (the table is unique per run, so a second call, a
retried hook or the sweep can never add another). A process that died between announcing a
run and recording its delivery leaves a gap that the sweep every ``Deliverer`` makes fills:
recently finished app runs that have no delivery yet.

Delivering. A ``Deliverer`` is a thread that leases due deliveries from the store (fenced
like the run queue: any number of deliverers in any number of processes; see
``corral/store/webhooks.py``) and POSTs each one's stored body with::

    Content-Type: application/json
    Corral-Delivery: <delivery id>          the same on every attempt: receivers dedupe on it
    Corral-Attempt: <n>
    Corral-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

signed with the ``webhook_secret`` of the app version that ran (no signature header if it
has none), at the moment of sending, through ``corral.outbound`` (no redirect followed, the
answer read up to 64 KiB and ignored). A 2xx answer delivers it; a connection error, a timeout
or any other status is retried after ``base_delay * 2 ** (attempt - 1)`` seconds (capped at
``max_delay``) until ``max_attempts`` attempts have failed; then it is ``failed``.

Delivery is at least once: a deliverer that stalls past its lease while the receiver is
still answering can be overtaken, so receivers should ignore a ``Corral-Delivery`` they have
already processed. ``verify_signature`` is what a receiver (in Python) checks a request with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from corral.errors import DeliveryFailed, InvalidInput, OutboundError, RunNotFound, UnusableURL
from corral.outbound import Client
from corral.pipeline.apps import Apps, AppSpec
from corral.states import RunStatus
from corral.store import Delivery, Run, Store

log = logging.getLogger("corral.webhooks")

SIGNATURE_HEADER = "Corral-Signature"
DELIVERY_HEADER = "Corral-Delivery"
ATTEMPT_HEADER = "Corral-Attempt"
TOLERANCE = 300  # seconds a signature's timestamp may be from the receiver's clock
_RESPONSE_LIMIT = 64 * 1024  # bytes of a receiver's answer read (and ignored)
_SWEEP_OVERLAP = timedelta(seconds=60)  # re-read behind the sweep cursor: late commits


# -- signatures ------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Corral-Signature`` header value for ``body`` sent at ``timestamp``."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes | str,
    tolerance: float = TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``header`` (a ``Corral-Signature`` value) signs ``body`` with ``secret``.

    ``body`` must be the request body exactly as received. False for a missing or malformed
    header, a signature that does not match (a tampered body, another secret) and a timestamp
    more than ``tolerance`` seconds from ``now`` (default: this host's clock), which is what
    keeps a captured request from being replayed later. Several ``v1`` entries are allowed:
    any one matching is enough.
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    raw = body.encode() if isinstance(body, str) else body
    expected = _mac(secret, timestamp, raw)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def payload(run: Run) -> str:
    """The body announcing that ``run`` ended: compact JSON, keys sorted."""
    return json.dumps(
        {
            "event": "run.finished",
            "run_id": run.id,
            "app": run.app,
            "app_version": run.app_version,
            "status": run.status,
            "trigger": run.trigger,
            "result": None if run.result is None else json.loads(run.result),
            "error_code": run.error_code,
            "error": run.error,
            "finished_at": None if run.finished_at is None else run.finished_at.isoformat(),
        },
        separators=(",", ":"),
        sort_keys=True,
    )


# -- enqueueing ------------------------------------------------------------------------------


class Webhooks:
    """Records deliveries for finished runs; shared by the workers and deliverers of a process."""

    def __init__(self, store: Store, apps: Apps | None = None) -> None:
        self.store = store
        self.apps = apps or Apps(store)
        self.work_available = threading.Condition()  # notified when a delivery is recorded
        self._specs: dict[tuple[str, int], AppSpec] = {}  # app versions never change
        self._lock = threading.Lock()

    def on_finished(self, run: Run) -> None:
        """The completion hook (``Pipeline.on_finished``)."""
        self.enqueue(run)

    def enqueue(self, run: Run) -> bool:
        """Record the delivery for ``run`` if its app version has a webhook; True if recorded."""
        if not RunStatus(run.status).terminal:
            return False
        spec = self.spec(run)
        if spec is None or not spec.webhook_url:
            return False
        added = self.store.webhooks.enqueue(run.id, spec.webhook_url, payload(run))
        if added:
            with self.work_available:
                self.work_available.notify_all()
        return added

    def spec(self, run: Run) -> AppSpec | None:
        """The spec of the app version ``run`` ran; None for a run that is not an app's."""
        if run.app is None or run.app_version is None:
            return None
        key = (run.app, run.app_version)
        with self._lock:
            cached = self._specs.get(key)
        if cached is None:
            _, cached = self.apps.get(run.app, run.app_version)
            with self._lock:
                self._specs[key] = cached
        return cached

    def sweep(self, since: datetime, limit: int = 500) -> tuple[int, datetime | None]:
        """Enqueue deliveries for app runs that ended after ``since`` without one.

        Returns how many were recorded, and the ``finished_at`` of the last run looked at
        when ``limit`` were (the next sweep must resume there), else None.
        """
        missed = self.store.webhooks.finished_without_delivery(since, limit)
        added = sum(1 for run in missed if self.enqueue(run))
        resume = missed[-1].finished_at if len(missed) >= limit else None
        return added, resume


# -- delivering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8  # then the delivery is failed
    base_delay: float = 1.0  # seconds before the 2nd attempt; doubled for each one after
    max_delay: float = 3600.0
    timeout: float = 10.0  # seconds to connect, and for each read of the answer

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput("a webhook needs at least one attempt")
        if self.base_delay < 0 or self.max_delay < 0 or self.timeout <= 0:
            raise InvalidInput("webhook delays cannot be negative, nor the timeout zero")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts."""
        return float(min(self.base_delay * 2 ** max(0, attempts - 1), self.max_delay))


def post(client: Client, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST ``body`` to ``url`` without following redirects; the status, if 2xx.

    ``DeliveryFailed`` otherwise (``permanent`` for a URL no retry can fix). The answer's body
    is read up to ``_RESPONSE_LIMIT`` bytes and ignored.
    """
    try:
        answer = client.request(
            "POST", url, headers=headers, body=body, timeout=timeout, limit=_RESPONSE_LIMIT
        )
    except UnusableURL as exc:
        raise DeliveryFailed(f"invalid webhook URL: {exc.detail}", permanent=True) from None
    except OutboundError as exc:  # refused, reset, timed out, TLS
        raise DeliveryFailed(exc.detail) from None
    if not answer.ok:
        raise DeliveryFailed(f"the receiver answered HTTP {answer.status}")
    return answer.status


class Deliverer:
    """A thread delivering due webhooks, one at a time; start as many as wanted, anywhere."""

    def __init__(
        self,
        webhooks: Webhooks,
        *,
        policy: RetryPolicy | None = None,
        name: str | None = None,
        lease: float | None = None,
        poll: float = 0.2,
        sweep_every: float = 5.0,
        sweep_window: float = 3600.0,
        client: Client | None = None,
    ) -> None:
        self.webhooks = webhooks
        self.client = client or Client()
        self.store = webhooks.store
        self.policy = policy or RetryPolicy()
        self.name = name or f"{socket.gethostname()}-webhooks-{secrets.token_hex(4)}"
        # Longer than any one attempt should take, so a live deliverer keeps its lease.
        self.lease = lease if lease is not None else max(30.0, 3 * self.policy.timeout + 5)
        self.poll = poll
        self.sweep_every = sweep_every
        self.sweep_window = sweep_window
        self._swept_to: datetime | None = None
        self._next_sweep = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Deliverer:
        self._thread = threading.Thread(
            target=self.run_forever, name=f"deliverer-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self.webhooks.work_available:
            self.webhooks.work_available.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.policy.timeout * 2 + 5)

    def run_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self.run_once():
                    with self.webhooks.work_available:
                        self.webhooks.work_available.wait(self.poll)
            except Exception:  # a supervisor: record, pause, carry on
                log.exception("deliverer %s: an iteration failed", self.name)
                self._stopping.wait(self.poll)

    def run_once(self) -> bool:
        """Sweep if it is time, then lease and attempt one due delivery. True if it did."""
        if self.sweep_every >= 0 and time.monotonic() >= self._next_sweep:
            self.sweep()
        delivery = self.store.webhooks.claim(self.name, self.lease)
        if delivery is None:
            return False
        self.deliver(delivery)
        return True

    def sweep(self) -> int:
        """Enqueue what finished runs' hooks missed; returns how many deliveries it added."""
        self._next_sweep = time.monotonic() + self.sweep_every
        now = datetime.now(UTC)
        if self._swept_to is None:
            since = now - timedelta(seconds=self.sweep_window)
        else:
            since = self._swept_to - _SWEEP_OVERLAP
        added, resume = self.webhooks.sweep(since)
        self._swept_to = resume if resume is not None else now
        if resume is not None:
            self._next_sweep = 0.0  # more to look at: go on at the next iteration
        return added

    def deliver(self, delivery: Delivery) -> str:
        """One attempt at a leased delivery; returns the status it was left in."""
        attempt = delivery.attempts
        if attempt > self.policy.max_attempts:  # its last attempt's deliverer died mid-way
            self._settle(
                self.store.webhooks.fail(
                    delivery.id,
                    self.name,
                    f"{attempt - 1} attempts were started; the last one never reported back",
                ),
                delivery,
            )
            return "failed"
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "corral-webhooks",
            DELIVERY_HEADER: str(delivery.id),
            ATTEMPT_HEADER: str(attempt),
        }
        try:
            secret = self._secret(delivery)
            if secret:
                headers[SIGNATURE_HEADER] = sign(secret, body, int(time.time()))
            post(self.client, delivery.url, body, headers, self.policy.timeout)
        except DeliveryFailed as failed:
            return self._failed(delivery, failed)
        self._settle(self.store.webhooks.delivered(delivery.id, self.name), delivery)
        log.info(
            "webhook %s for run %s delivered (attempt %d)", delivery.id, delivery.run_id, attempt
        )
        return "delivered"

    def _failed(self, delivery: Delivery, failed: DeliveryFailed) -> str:
        attempt = delivery.attempts
        if failed.permanent or attempt >= self.policy.max_attempts:
            reason = f"{failed.reason} (attempt {attempt} of {self.policy.max_attempts})"
            self._settle(self.store.webhooks.fail(delivery.id, self.name, reason), delivery)
            log.warning("webhook %s for run %s failed: %s", delivery.id, delivery.run_id, reason)
            return "failed"
        delay = self.policy.delay(attempt)
        at = datetime.now(UTC) + timedelta(seconds=delay)
        self._settle(self.store.webhooks.retry(delivery.id, self.name, failed.reason, at), delivery)
        log.info(
            "webhook %s for run %s: attempt %d failed (%s); next in %.1fs",
            delivery.id,
            delivery.run_id,
            attempt,
            failed.reason,
            delay,
        )
        return "pending"

    def _secret(self, delivery: Delivery) -> str | None:
        try:
            run = self.store.runs.get(delivery.run_id)
        except RunNotFound:
            raise DeliveryFailed("its run is no longer recorded", permanent=True) from None
        spec = self.webhooks.spec(run)
        return None if spec is None else spec.webhook_secret

    def _settle(self, settled: bool, delivery: Delivery) -> None:
        if not settled:
            log.warning(
                "webhook %s: deliverer %s lost its lease before recording the outcome",
                delivery.id,
                self.name,
            )
