"""Webhooks on real runs: one signed POST per finished run, retried with backoff, never twice.

A local receiver (stdlib HTTP server on 127.0.0.1) plays the app owner's endpoint; what it
does depends on the path: ``/ok`` answers 200, ``/flaky`` fails twice (a 500, then a dropped
connection) before answering 200, ``/down`` always answers 503, ``/slow`` answers after the
deliverer's timeout. Three deliverers share the work: the one ``start_workers`` starts, a
second in this process and a third on a store of its own, as another process would have.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.executor import AgentRequest
from corral.pipeline.service import Trigger
from corral.pipeline.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    Deliverer,
    RetryPolicy,
    Webhooks,
    verify_signature,
)
from corral.states import RunStatus
from corral.store import Delivery, Run, Store
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

POLICY = RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=10.0, timeout=1.0)

AGENT = """
def main(input):
    if input.get("fail"):
        raise ValueError("asked to fail")
    return {"echo": input}
"""


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int  # 0: the connection was dropped, or answered too late


class Receiver:
    """The app owner's endpoint: records every request, answers by path and attempt."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                hit = Hit(self.path, dict(self.headers.items()), body, time.monotonic(), 0)
                with receiver.lock:
                    receiver.hits.append(hit)
                    earlier = sum(1 for h in receiver.hits if h.path == self.path) - 1
                hit.answered = receiver.answer(self, earlier)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler, earlier: int) -> int:
        kind = handler.path.split("/")[1]
        if kind == "flaky" and earlier == 1:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)  # no answer at all
            return 0
        if kind == "slow":
            time.sleep(POLICY.timeout + 0.5)
            return 0  # the deliverer has given up on this attempt by now
        status = {"ok": 200, "down": 503}.get(kind, 500 if earlier == 0 else 200)
        handler.send_response(status)
        handler.send_header("content-length", "0")
        handler.end_headers()
        return status

    def at(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    made.thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


@pytest.fixture(scope="module")
def hooks_env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    code, _, err = run(
        corral, name, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(name, "an agent with a webhook")
    yield name
    corral.envs.delete(name)


@pytest.fixture(scope="module", autouse=True)
def deliverers(corral: Corral) -> Iterator[list[Deliverer]]:
    corral.start_workers(2, webhook_policy=POLICY)
    started = corral._deliverer
    assert started is not None and started.policy == POLICY
    elsewhere = Store.open(corral.settings.database_url)  # as another process would
    more = [
        Deliverer(corral.webhooks, policy=POLICY).start(),
        Deliverer(Webhooks(elsewhere), policy=POLICY).start(),
    ]
    yield [started, *more]
    for deliverer in more:
        deliverer.stop()
    corral.stop_workers()
    elsewhere.close()


@pytest.fixture
def user(corral: Corral) -> str:
    name = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(name, 100)
    return name


def hooked_app(corral: Corral, env: str, url: str | None) -> tuple[str, str]:
    name, secret = f"h-{secrets.token_hex(4)}", f"whsec-{secrets.token_hex(16)}"
    spec = AppSpec(env, "agent.py:main", webhook_url=url, webhook_secret=secret)
    corral.pipeline.apps.create(name, spec)
    return name, secret


def execute(corral: Corral, app: str, input: Any, user: str) -> Run:
    done = corral.pipeline.execute_agent(
        app, input, Trigger("http"), user=user, wait=True, wait_timeout=120
    )
    assert RunStatus(done.status).terminal, done.status
    return done


def settled(corral: Corral, run_id: str, timeout: float = 30) -> Delivery:
    """The run's delivery once it is delivered or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = corral.store.webhooks.for_run(run_id)
        if found is not None and found.status != "pending":
            return found
        time.sleep(0.05)
    pytest.fail(f"the delivery of run {run_id} did not settle: {found}")


def check_once(receiver: Receiver, path: str, delivery: Delivery) -> list[Hit]:
    """Every attempt reached the receiver exactly once; at most one was answered 2xx."""
    hits = receiver.at(path)
    assert len(hits) == delivery.attempts
    assert {h.headers[DELIVERY_HEADER] for h in hits} == {str(delivery.id)}
    assert sum(1 for h in hits if 200 <= h.answered < 300) == (delivery.status == "delivered")
    return hits


def test_each_finished_run_is_posted_once_signed(
    corral: Corral, hooks_env: str, receiver: Receiver, user: str
) -> None:
    path = f"/ok/{secrets.token_hex(4)}"
    app, secret = hooked_app(corral, hooks_env, receiver.base + path)
    ok = execute(corral, app, {"n": 1}, user)
    failed = execute(corral, app, {"fail": True}, user)
    assert (ok.status, failed.status) == ("succeeded", "failed")

    ids = {}
    for done in (ok, failed):
        delivery = settled(corral, done.id)
        assert (delivery.status, delivery.attempts) == ("delivered", 1)
        assert delivery.delivered_at is not None and delivery.lease_owner is None
        ids[done.id] = str(delivery.id)
    hits = receiver.at(path)
    assert len(hits) == 2
    bodies = {}
    for hit in hits:
        assert hit.headers["Content-Type"] == "application/json"
        assert verify_signature(secret, hit.headers[SIGNATURE_HEADER], hit.body)
        assert not verify_signature("whsec-wrong", hit.headers[SIGNATURE_HEADER], hit.body)
        body = json.loads(hit.body)
        assert hit.headers[DELIVERY_HEADER] == ids[body["run_id"]]
        bodies[body["run_id"]] = body

    assert ok.finished_at is not None
    assert bodies[ok.id] == {
        "event": "run.finished",
        "run_id": ok.id,
        "app": app,
        "app_version": 1,
        "status": "succeeded",
        "trigger": "http",
        "result": {"echo": {"n": 1}},
        "error_code": None,
        "error": None,
        "finished_at": ok.finished_at.isoformat(),
    }
    assert bodies[failed.id]["status"] == "failed"
    assert bodies[failed.id]["error_code"] == "agent_raised"
    assert "asked to fail" in bodies[failed.id]["error"]

    quiet, _ = hooked_app(corral, hooks_env, None)
    assert corral.store.webhooks.for_run(execute(corral, quiet, {}, user).id) is None


def test_a_receiver_that_fails_twice_gets_it_on_the_third_attempt(
    corral: Corral, hooks_env: str, receiver: Receiver, user: str
) -> None:
    path = f"/flaky/{secrets.token_hex(4)}"
    app, secret = hooked_app(corral, hooks_env, receiver.base + path)
    done = execute(corral, app, {"n": 2}, user)

    delivery = settled(corral, done.id)
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    assert delivery.last_error is not None  # the second attempt's: the dropped connection
    hits = check_once(receiver, path, delivery)
    assert [h.answered for h in hits] == [500, 0, 200]
    assert len({h.body for h in hits}) == 1  # the same body every time, freshly signed
    assert all(verify_signature(secret, h.headers[SIGNATURE_HEADER], h.body) for h in hits)
    first, second = hits[1].at - hits[0].at, hits[2].at - hits[1].at
    assert first >= POLICY.delay(1) and second >= POLICY.delay(2)
    assert second > first


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", ["down", "slow", "refused"])
def test_a_receiver_that_keeps_failing_ends_failed(
    corral: Corral, hooks_env: str, receiver: Receiver, user: str, kind: str
) -> None:
    path = f"/{kind}/{secrets.token_hex(4)}"
    base = f"http://127.0.0.1:{closed_port()}" if kind == "refused" else receiver.base
    app, _ = hooked_app(corral, hooks_env, base + path)
    done = execute(corral, app, {"n": 3}, user)

    delivery = settled(corral, done.id, timeout=60)
    assert (delivery.status, delivery.attempts) == ("failed", POLICY.max_attempts)
    expected = {"down": "HTTP 503", "slow": "timed out", "refused": "ConnectionRefusedError"}
    assert expected[kind] in (delivery.last_error or "")
    assert f"attempt 4 of {POLICY.max_attempts}" in (delivery.last_error or "")
    if kind != "refused":
        check_once(receiver, path, delivery)
    time.sleep(POLICY.delay(POLICY.max_attempts))
    assert corral.store.webhooks.get(delivery.id).attempts == POLICY.max_attempts  # no more


def test_a_run_that_ends_without_a_worker_is_still_announced(
    corral: Corral, hooks_env: str, receiver: Receiver, user: str
) -> None:
    path = f"/ok/{secrets.token_hex(4)}"
    app, secret = hooked_app(corral, hooks_env, receiver.base + path)
    # Queued but not due for an hour, so no worker takes it, then cancelled: no worker hook.
    queued = corral.executor.prepare(
        AgentRequest(hooks_env, "agent.py:main", {}, trigger="http", user=user, app=app),
        RunStatus.QUEUED,
        app=app,
        app_version=1,
        available_at=datetime.now(UTC) + timedelta(hours=1),
    )
    cancelled = corral.pipeline.cancel(queued.id)
    assert cancelled.status == "cancelled"

    delivery = settled(corral, queued.id, timeout=30)  # the deliverers' sweep found it
    assert delivery.status == "delivered"
    (hit,) = check_once(receiver, path, delivery)
    assert verify_signature(secret, hit.headers[SIGNATURE_HEADER], hit.body)
    assert json.loads(hit.body)["status"] == "cancelled"


def test_a_delivery_lease_is_exclusive_and_fenced(store: Store) -> None:
    records, now = store.webhooks, datetime.now(UTC)
    assert records.enqueue("run-x", "http://receiver.invalid/", "{}", now)
    assert not records.enqueue("run-x", "http://receiver.invalid/", "{}", now)  # one per run

    first = records.claim("a", 30, now)
    assert first is not None and (first.attempts, first.lease_owner) == (1, "a")
    assert records.claim("b", 30, now) is None  # leased to a
    later = now + timedelta(seconds=31)
    taken = records.claim("b", 30, later)  # a's lease ran out (a died or hung): b takes over
    assert taken is not None and (taken.id, taken.attempts) == (first.id, 2)
    assert not records.delivered(first.id, "a")  # a lost it: its outcome is not recorded
    assert not records.retry(first.id, "a", "late", later)

    assert records.retry(first.id, "b", "HTTP 500", later + timedelta(seconds=5))
    assert records.claim("c", 30, later + timedelta(seconds=1)) is None  # not due yet
    third = records.claim("c", 30, later + timedelta(seconds=6))
    assert third is not None and third.attempts == 3 and third.last_error == "HTTP 500"
    assert records.delivered(first.id, "c")
    assert records.get(first.id).status == "delivered"
    assert records.claim("d", 30, later + timedelta(hours=1)) is None  # settled for good
    assert not records.fail(first.id, "c", "too late")
