"""The bridge, proved from inside real sandboxes.

Every agent here runs in a runc sandbox from one environment that holds the official ``openai``
and ``anthropic`` SDKs (installed offline from wheels built on the host) and the agents of
``bridge_agent``. Upstreams are the local fakes of ``tests.fakes`` on the host's loopback,
which the bridge reaches and sandboxes cannot; each demands the user's REAL credential and
records what arrived. An agent reports what it observed as its JSON result; the test holds it
against what the fakes, the vault and the bridge's records saw.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.bridge import tokens
from corral.bridge.gate import BridgeGate
from corral.bridge.tokens import SigningKeyRing
from corral.context import Corral
from corral.pipeline.apps import AdHoc
from corral.store import BridgeCall, Run
from tests.fakes import (
    FakeAnthropic,
    FakeGitHub,
    FakeOAuthAPI,
    FakeOpenAI,
    FakeService,
    FakeSlack,
    FakeSlowUpstream,
)
from tests.fakes.base import words
from tests.integration import bridge_agent
from tests.integration.bridge_support import (
    INSTALL_WHEELS,
    SDKS,
    Control,
    Listener,
    bridge_drops,
    download_wheels,
    knock,
    outside_host,
    sdk_requirements,
    syn_counters,
    tar_of,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.runc]

# Every secret here matches this; an agent hunts for it without knowing any secret.
SECRET_PATTERN = r"sk-corral-[0-9a-f]{16,}"
JWT = bridge_agent.JWT


def new_secret() -> str:
    return "sk-corral-" + secrets.token_hex(24)


def new_user() -> str:
    return f"u-{secrets.token_hex(6)}"


@dataclass
class World:
    corral: Corral
    env: str
    gate: BridgeGate
    keys: dict[str, str]
    control: Control
    openai: FakeOpenAI
    anthropic: FakeAnthropic
    github: FakeGitHub
    slack: FakeSlack
    slow: FakeSlowUpstream
    chatty: Run  # the first run: it folded the runner in and warmed everything up
    chatty_tag: str
    fakes: list[FakeService] = field(default_factory=list)

    def grant(self, user: str, *connections: str) -> None:
        """Store ``user``'s credential for each connection (and for the test control service)."""
        kinds = {"openai": "api_key", "anthropic": "api_key"}
        secret_of = {"echo": "slow"}
        for name in (*connections, "ctl"):
            kind = kinds.get(name, "bearer")
            if name == "ctl":
                fields = {"token": "ctl-" + secrets.token_hex(8)}
            else:
                value = self.keys[secret_of.get(name, name)]
                fields = {"key": value} if kind == "api_key" else {"token": value}
            self.corral.vault.put(user, name, kind, fields)

    def run(
        self,
        entry: str,
        input: Any,
        user: str,
        connections: tuple[str, ...],
        on_event: Callable[..., None] | None = None,
        timeout: float = 60,
    ) -> Run:
        spec = AdHoc(
            self.env, f"agent.py:{entry}", connections=(*connections, "ctl"), timeout=timeout
        )
        return self.corral.run_here(spec, input, user=user, on_event=on_event)

    def calls(self, run: str | None = None) -> list[BridgeCall]:
        return self.corral.store.usage.calls(run, limit=1_000_000)


def result(run: Run) -> Any:
    assert run.status == "succeeded", (run.status, run.error_code, run.error)
    return json.loads(run.result or "null")


def _install(corral: Corral, env: str, wheel_dir: Path) -> None:
    try:
        wheels = download_wheels(wheel_dir)
    except subprocess.CalledProcessError:
        wheels = []  # no registry from the host: the edit session asks the registry itself
    out = wheel_dir / "install.log"
    with open(out, "w+b") as log:
        if wheels:
            bundle = wheel_dir / "wheels.tar"
            bundle.write_bytes(tar_of(wheels))
            script = INSTALL_WHEELS.format(names=" ".join(SDKS))
            with open(bundle, "rb") as tar:
                done = corral.envs.exec(
                    env, ("sh", "-c", script), stdin=tar, stdout=log, stderr=log, timeout=300
                )
        else:
            argv = ("pip", "install", "-q", "--no-cache-dir", *sdk_requirements())
            done = corral.envs.exec(env, argv, stdout=log, stderr=log, timeout=300)
        log.seek(0)
        assert done.exit_code == 0, log.read().decode()
    with open(bridge_agent.__file__, "rb") as agent:
        done = corral.envs.exec(env, ("sh", "-c", "cat > /home/user/agent.py"), stdin=agent)
    assert done.exit_code == 0
    corral.envs.freeze(env, "the official SDKs and the bridge test agents")


@pytest.fixture(scope="module")
def world(corral: Corral, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    bridge = corral.bridge()
    assert bridge is not None, "another process serves the bridge: these tests need this one"
    keys = {name: new_secret() for name in ("openai", "anthropic", "github", "slack", "slow")}
    fakes: list[FakeService] = []
    env = f"bridge-{secrets.token_hex(3)}"

    def started(fake: Any) -> Any:
        fakes.append(fake.start())
        return fake

    control = started(Control())
    openai = started(FakeOpenAI(keys["openai"]))
    anthropic = started(FakeAnthropic(keys["anthropic"], accept_bearer=False))  # x-api-key only
    github = started(FakeGitHub(keys["github"]))
    slack = started(FakeSlack(keys["slack"]))
    slow = started(FakeSlowUpstream(token=keys["slow"]))
    # Before the first call of the module: the gate caches profiles for 5 s.
    profiles = {
        "openai": (openai.url, "bearer", "openai"),
        "anthropic": (anthropic.url, "header:x-api-key", "anthropic"),
        "github": (github.url, "bearer", None),
        "slack": (slack.url, "bearer", None),
        "slow": (slow.url, "bearer", None),
        "echo": (slow.url, "bearer", None),
        "ctl": (control.url, "bearer", None),
    }
    try:
        for name, (url, auth, meter) in profiles.items():
            corral.store.connections.put(name, url, auth, meter)
        corral.envs.create(env)
        _install(corral, env, tmp_path_factory.mktemp("wheels"))
        tag = secrets.token_hex(4)
        chatty = corral.run_here(AdHoc(env, "agent.py:chatty"), {"tag": tag}, user=new_user())
        yield World(
            corral,
            env,
            bridge.gate,
            keys,
            control,
            openai,
            anthropic,
            github,
            slack,
            slow,
            chatty,
            tag,
            fakes,
        )
    finally:
        for fake in fakes:
            fake.stop()
        for name in profiles:
            corral.store.connections.remove(name)
        if any(e.name == env for e in corral.envs.all()):
            corral.envs.delete(env)


@pytest.fixture(autouse=True)
def fresh(world: World) -> Iterator[None]:
    """Each test sees only its own requests; the gate's limits are as they were after it."""
    for fake in world.fakes:
        fake.requests.clear()
    world.openai.completions.clear()
    world.anthropic.messages.clear()
    world.control.hooks.clear()
    limits = (world.gate.upstream_timeout, world.gate.max_body)
    yield
    world.gate.upstream_timeout, world.gate.max_body = limits


def sandbox_address(world: World, run: Run) -> str:
    booted = [e for e in world.corral.store.runs.events(run.id) if e.kind == "sandbox.booted"]
    return str(json.loads(booted[-1].data)["address"])


def authorizations(fake: FakeService, header: str = "Authorization") -> list[str]:
    return [r.headers.get(header, "") for r in fake.requests]


def sent_anything(fake: FakeService, needle: str) -> bool:
    """Whether ``needle`` was in any header or body the fake received."""
    return any(
        needle in value or needle.encode() in r.body
        for r in fake.requests
        for _, value in r.headers.raw_items()
    )


# -- 1. no credential anywhere in the sandbox --------------------------------------------------


def test_no_stored_credential_is_anywhere_in_the_sandbox(world: World) -> None:
    user = new_user()
    world.grant(user, "openai", "echo")
    decoy = new_secret()  # secret-shaped, but no credential: the scan must find this one
    run = world.run(
        "snoop", {"secret_pattern": SECRET_PATTERN, "decoy": decoy}, user, ("openai", "echo")
    )
    out = result(run)
    stats = out["stats"]
    print(json.dumps(stats)[:2000])

    # The credential was in use: the upstream got the real key, through the bridge.
    assert out["used"] == 200
    assert authorizations(world.openai) == [f"Bearer {world.keys['openai']}"]
    # An upstream that reflects the request's headers: the bridge overwrote the secret.
    assert out["reflected_status"] == 200
    reflected = dict((k.lower(), v) for k, v in out["reflected_headers"])
    assert reflected["authorization"] == "*" * len(f"Bearer {world.keys['slow']}")
    assert authorizations(world.slow) == [f"Bearer {world.keys['slow']}"]

    found = out["found"]
    # Nowhere: environ, /proc/*/environ and cmdline, files, process memory, Python objects.
    # Only the decoy the agent was handed matches: were a stored secret anywhere, it would too.
    assert list(found[SECRET_PATTERN]) == [decoy], found[SECRET_PATTERN]
    assert {"python", "memory:self"} <= set(found[SECRET_PATTERN][decoy])

    # Controls: each place searched does hold what it should, so the scan can see.
    places = found[JWT].get(out["token"], [])
    assert "python" in places and "memory:self" in places, (places, list(found[JWT]))
    assert "file:/home/user/agent.py" in found[bridge_agent.FS_CANARY][bridge_agent.FS_CANARY]
    path_places = {p for ps in found[r"PATH=[^\x00\n]{1,200}"].values() for p in ps}
    assert "environ" in path_places and any(p.endswith(":environ") for p in path_places)
    assert stats["files"] > 1000 and not stats["files_capped"], stats
    assert "self" in stats["memory_readable"] and stats["memory_bytes"] > 10 << 20, stats
    assert stats["proc_files"], stats


# -- 2. bad tokens ---------------------------------------------------------------------------


def test_bad_tokens_are_refused_and_reach_no_upstream(world: World) -> None:
    user = new_user()
    world.grant(user, "openai", "github")  # github: stored, but not in the token's scope
    scope = ("openai", "slack")  # slack: in scope, but no credential stored
    finished = world.chatty
    assert finished.finished_at is not None

    def mint(args: dict[str, Any]) -> dict[str, str]:
        """Tokens exactly like the run's own but for one property each."""
        claims = dict(
            user=user,
            app="",
            session=args["run"],
            run=args["run"],
            connections=(*scope, "ctl"),
            address=args["address"],
        )
        valid = tokens.mint(world.corral.signing_keys, **claims, lifetime=600)
        payload = jwt.decode(valid, options={"verify_signature": False})
        kid = jwt.get_unverified_header(valid)["kid"]
        return {
            "expired": tokens.mint(world.corral.signing_keys, **claims, lifetime=-10),
            "unknown_key": tokens.mint(SigningKeyRing(), **claims, lifetime=600),
            "known_kid": jwt.encode(
                payload, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": kid}
            ),
        }

    world.control.on("mint", mint)
    finished_token = json.loads(finished.result or "{}")["token"]
    run = world.run("knock", {"finished_token": finished_token}, user, scope)
    out = result(run)
    seen = {name: (c["status"], c["error"]) for name, c in out["calls"].items()}
    print(
        seen,
        "finished run's sandbox:",
        sandbox_address(world, finished),
        "this one:",
        out["address"],
    )
    assert seen == {
        "control": (200, None),
        "no_token": (401, "token_missing"),
        "garbage": (401, "token_malformed"),
        "forged_unknown_key": (401, "token_forged"),
        "forged_known_kid": (401, "token_forged"),
        "tampered": (401, "token_forged"),
        "alg_none": (401, "token_forged"),
        "expired": (401, "token_expired"),
        # Revocation is checked before the address (Verifier.verify), and the executor revoked
        # the finished run in this process's verifier as it ended (TokenIssuer.ended): so
        # token_revoked, whether or not this sandbox got the finished one's address again.
        "revoked": (401, "token_revoked"),
        "out_of_scope": (403, "out_of_scope"),
        "no_credential": (403, "no_credential"),
    }
    assert world.corral.verifier.revoked(finished.id)
    assert out["claims"]["run"] == run.id and out["claims"]["adr"] == out["address"]

    # Only the control call reached an upstream, with the real key.
    assert authorizations(world.openai) == [f"Bearer {world.keys['openai']}"]
    assert len(world.openai.completions) == 1
    assert not world.github.requests and not world.slack.requests

    # Every refusal is in the audit table, from this sandbox, with its code.
    expected = sorted(e for _, e in seen.values() if e)

    started = run.started_at
    assert started is not None

    def refused() -> list[BridgeCall]:
        return [
            r for r in world.calls() if r.peer == out["address"] and r.error and r.at >= started
        ]

    wait_for(lambda: len(refused()) >= len(expected), what="the refusals' audit rows")
    assert sorted(r.error or "" for r in refused()) == expected


# -- 3. outside the sandbox subnet -----------------------------------------------------------


def test_the_bridge_port_is_closed_to_everything_but_sandboxes(world: World) -> None:
    net = world.corral.settings.network
    gw, port = str(net.gateway), net.bridge_port
    before = bridge_drops()
    since = time.time()
    with outside_host(gw) as outside, syn_counters(gw, port, ["lo", outside.host_if]) as syns:
        near = Listener(outside.near)
        try:
            with ThreadPoolExecutor(4) as pool:
                attempts = {
                    "loopback": pool.submit(knock, gw, port, "127.0.0.1"),
                    # The host's own source address on that link is the gateway itself: an
                    # address INSIDE the subnet, which the gate alone would admit.
                    "host": pool.submit(knock, gw, port),
                    "netns": pool.submit(knock, gw, port, netns=outside.netns),
                    "netns_control": pool.submit(
                        knock, outside.near, near.port, netns=outside.netns
                    ),
                }
                seen = {name: f.result() for name, f in attempts.items()}
        finally:
            near.close()
        arrived = syns()
    dropped = bridge_drops() - before
    print(seen, f"{arrived=} corral's drop counter: {dropped:+d}")

    # The link works (the control connects and is seen from the outside address) ...
    assert seen["netns_control"]["connect"] == "connected", seen
    assert near.peers == [outside.address], near.peers
    # ... the SYNs to the bridge port did reach this host's input hook ...
    assert arrived["lo"] >= 2 and arrived[outside.host_if] >= 1, arrived
    # ... and were never answered: no connection, so no byte of HTTP was read (the gate would
    # have accepted, then reset: "connected"). nftables' input chain dropped them.
    for name in ("loopback", "host", "netns"):
        assert seen[name] == {"connect": "timeout"}, (name, seen)
    time.sleep(0.3)  # the sink's batch interval, several times over
    peers = {"127.0.0.1", gw, outside.address, outside.near}
    recent = [r for r in world.calls() if r.at.timestamp() >= since - 1]
    assert not [r for r in recent if r.peer in peers], recent


# -- 4. a token copied to another sandbox ------------------------------------------------------


def test_a_token_works_only_in_the_sandbox_it_was_minted_for(world: World) -> None:
    owner, thief = new_user(), new_user()
    world.grant(owner, "openai")
    world.grant(thief, "openai")
    handed: dict[str, Any] = {}
    got, release = threading.Event(), threading.Event()

    def handover(args: dict[str, Any]) -> bool:
        handed.update(args)
        got.set()
        return True

    world.control.on("handover", handover)
    world.control.on("released", lambda _: release.is_set())
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(world.run, "hold", {"hold": 45}, owner, ("openai",))
        try:
            assert got.wait(60), "the first run never handed its token over"
            thief_run = world.run("borrow", {"token": handed["token"]}, thief, ("openai",))
        finally:
            release.set()
        owner_run = holding.result(timeout=90)
    a, b = result(owner_run), result(thief_run)
    print(a["address"], b["address"], b["stolen"])

    assert a["released"] and a["address"] == handed["address"] != b["address"]
    assert (b["stolen"]["status"], b["stolen"]["error"]) == (403, "token_wrong_sandbox")
    assert b["own"]["status"] == 200  # the thief's own token works from there ...
    assert a["own"]["status"] == 200  # ... and the stolen one was live all along, at home
    # Two calls reached the upstream: each sandbox's own, none with the stolen token.
    assert authorizations(world.openai) == [f"Bearer {world.keys['openai']}"] * 2
    assert len(world.openai.completions) == 2


# -- 5. the official SDKs --------------------------------------------------------------------


def test_the_official_sdks_work_through_the_bridge(world: World) -> None:
    user = new_user()
    world.grant(user, "openai", "anthropic")
    prompt = "hello from inside the sandbox"
    run = world.run(
        "sdks", {"prompt": prompt, "secret_pattern": SECRET_PATTERN}, user, ("openai", "anthropic")
    )
    out = result(run)
    token = out["token"]
    expected = {
        "openai": (f"echo: {prompt}", [words(prompt), words(f"echo: {prompt}")]),
        "openai_stream": (
            f"echo: {prompt} streamed",
            [words(f"{prompt} streamed"), words(f"echo: {prompt} streamed")],
        ),
        "anthropic": (
            f"echo: {prompt} to claude",
            [words(f"{prompt} to claude"), words(f"echo: {prompt} to claude")],
        ),
        "anthropic_stream": (
            f"echo: {prompt} streamed to claude",
            [
                words(f"be brief {prompt} streamed to claude"),
                words(f"echo: {prompt} streamed to claude"),
            ],
        ),
    }
    for name, (text, usage) in expected.items():
        assert (out[name]["text"], out[name]["usage"]) == (text, usage), (name, out[name])
    assert out["openai_stream"]["chunks"] > 1 and out["anthropic_stream"]["chunks"] > 1

    # The fakes got the REAL keys (they refuse anything else), never the run token.
    assert authorizations(world.openai) == [f"Bearer {world.keys['openai']}"] * 2
    assert authorizations(world.anthropic, "x-api-key") == [world.keys["anthropic"]] * 2
    assert all("authorization" not in r.headers for r in world.anthropic.requests)
    for fake in (world.openai, world.anthropic):
        assert not sent_anything(fake, token)
    assert [r.json().get("stream", False) for r in world.openai.requests] == [False, True]
    assert [r.json().get("stream", False) for r in world.anthropic.requests] == [False, True]

    # The sandbox saw none of it (control: its own token, found where it lives).
    assert out["found"][SECRET_PATTERN] == {}
    assert "python" in out["found"][JWT].get(token, [])

    # Usage, as the bridge read it from the providers' answers.
    metered = wait_for(
        lambda: (
            [u for u in world.corral.store.usage.events(run.id) if u.kind == "model_tokens"]
            if len(world.corral.store.usage.events(run.id)) >= 5
            else None
        ),
        what="four model usage rows",
    )
    assert sorted((u.connection, u.input_tokens, u.output_tokens) for u in metered) == (
        sorted((name.split("_")[0], *usage) for name, (_, usage) in expected.items())
    )
    assert all(u.user == user for u in metered)

    # One audit row per call, with what happened and no credential.
    rows = wait_for(
        lambda: (
            [r for r in world.calls(run.id) if r.connection in ("openai", "anthropic")]
            if len([r for r in world.calls(run.id) if r.connection != "_corral"]) >= 4
            else None
        ),
        what="four audit rows",
    )
    assert sorted((r.method, r.path, r.status, r.error) for r in rows) == sorted(
        [("POST", "/openai/v1/chat/completions", 200, None)] * 2
        + [("POST", "/anthropic/v1/messages", 200, None)] * 2
    )
    for row in rows:
        assert row.bytes_in > 0 and row.bytes_out > 0 and row.latency_ms > 0, row
        assert row.peer.startswith("10.213.") and row.run == run.id, row
    for row in world.calls(run.id):
        text = repr(row)
        assert not any(key in text for key in world.keys.values()) and token not in text, row


# -- 6. OAuth 2 --------------------------------------------------------------------------------


def test_oauth_tokens_are_refreshed_host_side(world: World) -> None:
    user, connection = new_user(), f"oauth-{secrets.token_hex(3)}"
    with FakeOAuthAPI() as api:
        world.corral.store.connections.put(connection, api.url, "bearer", None)
        first_access = api.access_token
        assert first_access is not None and api.refresh_token is not None
        world.corral.vault.put(
            user,
            connection,
            "oauth2",
            {
                "access_token": first_access,
                "refresh_token": api.refresh_token,
                "token_url": f"{api.url}/oauth/token",
                "client_id": api.client_id,
                "client_secret": api.client_secret,
                "expires_at": int(time.time()) - 60,
            },
        )
        world.grant(user)
        world.control.on("expire", lambda _: api.expire_access_token())
        pattern = r"\b(?:at|rt)-[0-9]+-[0-9a-f]{24}"
        run = world.run(
            "oauth", {"connection": connection, "token_pattern": pattern}, user, (connection,)
        )
        out = result(run)
        issued = list(api.issued_access_tokens)
        data_calls = [r.headers["Authorization"] for r in api.requests.matching("GET", "/v1/data")]
        grants = [r.form() for r in api.requests.matching("POST", "/oauth/token")]
        refreshes, rejected = api.refresh_count, api.rejected_tokens
        current = api.access_token
    world.corral.store.connections.remove(connection)

    # Proactive: the stored token had expired, so the first call went out with a fresh one.
    assert (out["first"]["status"], out["first"]["body"]["token_serial"]) == (200, 2)
    # Mid-life: the upstream said 401; the bridge refreshed and retried, the sandbox saw 200.
    assert (out["second"]["status"], out["second"]["body"]["token_serial"]) == (200, 3)
    assert len(issued) == 3 and refreshes == 2 and rejected == 1
    assert data_calls == [f"Bearer {issued[1]}", f"Bearer {issued[1]}", f"Bearer {issued[2]}"]
    assert first_access not in " ".join(data_calls)  # the expired token was never sent
    assert [g["grant_type"] for g in grants] == ["refresh_token"] * 2
    # The vault holds the newest token, with its new expiry.
    stored = world.corral.vault.resolve(user, connection)
    assert stored.access_token is not None and stored.access_token.reveal() == current == issued[2]
    assert stored.expires_at is not None and int(stored.expires_at) > time.time() + 3000
    # The sandbox never saw an access or refresh token (control: it did find its run token).
    assert out["found"][pattern] == {}, out["found"][pattern]
    assert "python" in out["found"][JWT].get(out["token"], [])

    def oauth_rows() -> list[BridgeCall]:
        return [r for r in world.calls(run.id) if r.connection == connection]

    wait_for(lambda: len(oauth_rows()) >= 2, what="the OAuth calls' audit rows")
    rows = oauth_rows()
    assert [(r.path, r.status) for r in rows] == [(f"/{connection}/v1/data", 200)] * 2


# -- 7. bad input and upstream failures ------------------------------------------------------


def test_bad_input_and_upstream_failures(world: World) -> None:
    user, unknown = new_user(), f"nope-{secrets.token_hex(3)}"
    world.grant(user, "slow", "github", "slack")
    gate = world.gate
    saved = (gate.upstream_timeout, gate.max_body)

    def upstream_timeout(args: dict[str, Any]) -> None:
        gate.upstream_timeout = float(args["seconds"])

    def max_body(args: dict[str, Any]) -> None:
        gate.max_body = int(args["bytes"])

    def restore(_: dict[str, Any]) -> None:
        gate.upstream_timeout, gate.max_body = saved

    for name, fn in (
        ("upstream_timeout", upstream_timeout),
        ("max_body", max_body),
        ("restore", restore),
    ):
        world.control.on(name, fn)
    run = world.run("bad", {"unknown": unknown}, user, ("slow", "github", "slack", unknown))
    out = result(run)
    print(
        {
            k: (v.get("status"), v.get("error"), v.get("failure"), v["seconds"])
            for k, v in out.items()
        }
    )
    assert (gate.upstream_timeout, gate.max_body) == saved

    assert (out["unknown"]["status"], out["unknown"]["error"]) == (404, "unknown_connection")
    assert (out["timeout"]["status"], out["timeout"]["error"]) == (504, "upstream_timeout")
    assert 0.9 <= out["timeout"]["seconds"] < 3.5, out["timeout"]
    assert (out["reset"]["status"], out["reset"]["error"]) == (502, "upstream_reset")
    # Over the limit (8000 bytes against 4096, Content-Length): refused before any upstream.
    assert (out["too_big"]["status"], out["too_big"]["error"]) == (413, "body_too_large")
    assert out["after"]["status"] == 200 and out["after"]["body"]["body_length"] == 8000

    assert out["github"]["status"] == 200 and out["github"]["body"]["login"] == "octocat"
    assert authorizations(world.github) == [f"Bearer {world.keys['github']}"]
    assert out["slack"]["status"] == 200 and out["slack"]["body"]["ok"] is True
    assert authorizations(world.slack) == [f"Bearer {world.keys['slack']}"]
    assert world.slack.posted[-1]["text"] == "through the bridge"
    # The slow upstream saw the timed-out, the reset and the last call; not the big body.
    assert [r.path for r in world.slow.requests] == ["/delay/4", "/reset", "/echo/after"]


def test_a_body_far_over_the_limit_is_answered_413_not_reset(world: World) -> None:
    """The sandbox must be able to read the 413, whatever the body's size (RFC 9112 9.6).

    64 MiB is more than the socket buffers on both ends hold, so the client is still sending
    when the bridge answers. The bridge then closes at once (``ClientProtocol._next``) with
    the rest of the body unread; a socket closed with unread input sends a TCP reset, and the
    client's send fails (EPIPE/ECONNRESET) before it can read the answer. Under the default
    10 MiB limit the same happens to any upload that exceeds it by more than the buffers hold.
    """
    user = new_user()
    world.grant(user, "slow")
    gate = world.gate
    saved = gate.max_body

    def max_body(args: dict[str, Any]) -> None:
        gate.max_body = int(args["bytes"])

    def restore(_: dict[str, Any]) -> None:
        gate.max_body = saved

    world.control.on("max_body", max_body)
    world.control.on("restore", restore)
    out = result(world.run("oversize", {"size": 64 << 20}, user, ("slow",)))
    seen = {k: (v["status"], v.get("error"), v.get("failure")) for k, v in out.items()}
    print(seen)
    assert gate.max_body == saved and out["after"]["status"] == 200
    # Neither body reached the upstream ...
    assert [r.path for r in world.slow.requests] == ["/echo/after"]
    # ... and the sandbox is told why, with the bridge's own answer.
    assert seen["sized"][:2] == (413, "body_too_large"), seen
    assert seen["chunked"][:2] == (413, "body_too_large"), seen


# -- 8. logs and results ---------------------------------------------------------------------


def test_logs_and_the_result_arrive_through_the_bridge(world: World) -> None:
    run = world.chatty
    assert result(run)["said"] == "hello"
    events = [(e.kind, json.loads(e.data)) for e in world.corral.store.runs.events(run.id)]
    logs = [d for k, d in events if k == "log" and d.get("stream") == "sdk"]
    assert [(d["message"], d["fields"]) for d in logs] == [
        ("chatty says hello", {"n": 3, "tag": world.chatty_tag})
    ]
    results = [d for k, d in events if k == "result"]
    assert [d["output"] for d in results] == [json.loads(run.result or "")]
    assert any(k == "runner.started" for k, _ in events)
    posts = wait_for(
        lambda: [r for r in world.calls(run.id) if r.connection == "_corral"],
        what="the event POSTs' audit rows",
    )
    assert posts and all(
        (r.method, r.path, r.status, r.error) == ("POST", "/_corral/events", 202, None)
        and r.bytes_in > 0
        for r in posts
    ), posts


# -- 9. request smuggling from a real sandbox ----------------------------------------------------


def test_a_smuggled_request_steals_no_other_users_call(world: World) -> None:
    """Alice's sandbox hides a request in a chunked GET body; bob's call right after must reach
    the upstream as his own request, and alice must never read his credential back."""
    alice, bob = new_user(), new_user()
    world.grant(alice, "slow")
    world.grant(bob, "slow")
    inner = "POST /echo/stash HTTP/1.1\r\nhost: up\r\ncontent-length: 400\r\n\r\n"
    assert result(world.run("smuggle", {"inner": inner}, alice, ("slow",)))["status"] == 200
    victim = result(world.run("fetch", {"path": "/echo/victim"}, bob, ("slow",)))
    assert victim["status"] == 200
    again = result(world.run("fetch", {"path": "/echo/again"}, alice, ("slow",)))
    assert world.keys["slow"] not in json.dumps(again)
    seen = [(r.method, r.path, r.body) for r in world.slow.requests]
    assert seen == [
        ("GET", "/echo/smuggler", inner.encode()),
        ("GET", "/echo/victim", b""),
        ("GET", "/echo/again", b""),
    ], seen
