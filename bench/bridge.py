"""The bridge's cost: latency it adds to a forwarded call, and the calls per second it carries.

Every path ends at the same upstream, an nginx server block on 127.0.0.1 that answers
``{"ok":true}`` only when the request carries ``Authorization: Bearer <secret>`` (anything
else is a 401, and a run with a single non-2xx answer fails), so every path must really
inject the credential. The client is ``wrk`` (keep-alive, ``--latency``) with the same
threads and connections on every path:

* direct:  host namespace -> 127.0.0.1 upstream, the credential sent by wrk itself.
* veth:    a sandbox namespace -> nginx on the gateway -> same answer: the floor of the
           sandbox's own path (its veth pair and nftables), no proxy.
* bridge:  a sandbox namespace -> the bridge on the gateway (run token checked, credential
           attached, call recorded) -> upstream, over a pooled keep-alive connection.
* nginx:   host namespace -> nginx reverse proxy on 127.0.0.1 (``proxy_set_header
           Authorization``, HTTP/1.1 upstream keep-alive) -> upstream: a mature proxy doing
           the same header injection, for throughput.

Reported: p50/p99 latency at 1 and at 64 connections, bridge minus direct (the figure the
targets name) and bridge minus veth (the proxy alone); calls/s at 64 connections, bridge and
nginx; and what bounds the bridge: the CPU its event-loop thread used per call and how busy
it (and the machine) were. The bridge serves in-process, on one uvloop thread, as ``corral
run`` serves it. Targets: added p50 at most 1 ms at one connection; at least 5,000 calls/s.

Usage: ``bench/bridge.py [SECONDS per measurement, default 6] [ROUNDS, default 1]``. Rounds
interleave the paths; each figure is the median over rounds. The bridge takes a port of
``BRIDGE_PORTS`` (``CORRAL_BRIDGE_PORT``, or the highest free one) and a sandbox slot; both,
the namespace, nginx and the run are released on every way out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import discard
from corral.bridge.tokens import mint
from corral.config import BRIDGE_PORTS, Settings
from corral.context import Corral
from corral.processes import Owner
from corral.sandbox.network import Link, Network
from corral.sandbox.runc_runtime import RuncRuntime
from corral.sandbox.slots import Record
from corral.states import RunStatus
from corral.store import Run

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
WARMUP_S = 1
MANY = 64
CONNECTION = "bench"
USER = "bench"
PY = str(Path(sys.executable))

# -- wrk ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(out: str) -> Load:
    """wrk's report: the 50%/99% rows of ``--latency``, Requests/sec, and every error line."""
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{m.group(1)} calls were not answered 2xx:\n{out}")
    if m := re.search(r"Socket errors: (.*)", out):
        raise RuntimeError(f"wrk saw socket errors ({m.group(1)}):\n{out}")
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (p50 and p99 and rps and total):
        raise RuntimeError(f"cannot read wrk's report:\n{out}")
    return Load(_ms(p50.group(1)), _ms(p99.group(1)), float(rps.group(1)), int(total.group(1)))


def wrk(url: str, conns: int, seconds: int, header: str, netns: str | None = None) -> Load:
    threads = 1 if conns == 1 else 2
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", header, url]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:-2])} ... failed:\n{proc.stdout}{proc.stderr}")
    return parse_wrk(proc.stdout)


# -- nginx: the upstream, the reverse proxy, and the veth floor ---------------------------------

NGINX_CONF = """\
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type application/json;
    upstream fast {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{  # the upstream every path ends at
        listen 127.0.0.1:{upstream};
        location / {{
            if ($http_authorization != "Bearer {secret}") {{ return 401; }}
            return 200 '{{"ok":true}}';
        }}
    }}
    server {{  # the same answer on the gateway, for a client in a sandbox namespace
        listen {gateway}:{floor};
        location / {{
            if ($http_authorization != "Bearer {secret}") {{ return 401; }}
            return 200 '{{"ok":true}}';
        }}
    }}
    server {{  # nginx as the bridge: a reverse proxy that injects the credential
        listen 127.0.0.1:{proxy};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {secret}";
        }}
    }}
}}
"""


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Nobody listens on host:port. The probe sets no SO_REUSEPORT, so it also fails where
    another bridge listens (which would otherwise share our connections with us)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def gateway_ports(gateway: str, wanted: int | None) -> tuple[int, int]:
    """Two free sandbox-reachable ports: the bridge's and the veth floor's."""
    if wanted is not None:
        if not port_free(gateway, wanted):
            raise SystemExit(
                f"bridge bench: {gateway}:{wanted} (CORRAL_BRIDGE_PORT) is held by another "
                "process; stop it or choose another port"
            )
        candidates = [wanted]
    else:
        candidates = []
    # From the top of the range: the tests pick theirs at random in 8800-8879.
    for port in reversed(BRIDGE_PORTS):
        if port not in candidates and port_free(gateway, port):
            candidates.append(port)
        if len(candidates) == 2:
            return candidates[0], candidates[1]
    raise SystemExit(f"bridge bench: no two free ports in {BRIDGE_PORTS} on {gateway}")


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nginx is not listening on {host}:{port} after 10 s")


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if this process dies, even by SIGKILL (nginx then
    stops its workers), since no clean-up of ours would run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # nginx: fast shutdown, the workers with it
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- CPU accounting ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(tid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a thread of this process has used."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def thread_waited_s(tid: int) -> float:
    """Seconds a thread of this process has spent runnable but waiting for a CPU."""
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1]) / 1e9


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds since boot, over every CPU."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _TICK, sum(ticks) / _TICK


def bridge_threads() -> dict[str, int]:
    """Kernel thread ids of the bridge's event loop and of its recording (sink) thread."""
    named = {t.name: t.native_id for t in threading.enumerate()}
    loop, sink = named.get("bridge"), named.get("bridge-sink")
    if loop is None or sink is None:
        raise RuntimeError(f"cannot find the bridge's threads among {sorted(named)}")
    return {"loop": loop, "sink": sink}


@dataclass(frozen=True)
class Cpu:
    """Where the bridge's CPU went during one measurement (shares of one CPU, but machine)."""

    loop_user: float  # the event-loop thread in user space: Python, httptools, uvloop
    loop_sys: float  # the event-loop thread in the kernel: socket reads and writes, epoll
    loop_waited: float  # the event-loop thread runnable but without a CPU (the machine is full)
    sink: float  # the thread that writes the audit rows
    machine: float  # share of all the machine's CPUs busy, whoever used them
    per_call_us: float  # event-loop CPU per forwarded call

    @property
    def loop(self) -> float:
        return self.loop_user + self.loop_sys


def measured(threads: dict[str, int], run: Callable[[], Load]) -> tuple[Load, Cpu]:
    before = {k: thread_cpu_s(t) for k, t in threads.items()}
    waited = thread_waited_s(threads["loop"])
    busy0, total0 = machine_busy()
    t = time.perf_counter()
    load = run()
    wall = time.perf_counter() - t
    busy1, total1 = machine_busy()
    after = {k: thread_cpu_s(t) for k, t in threads.items()}
    waited = thread_waited_s(threads["loop"]) - waited
    user = after["loop"][0] - before["loop"][0]
    system = after["loop"][1] - before["loop"][1]
    sink = sum(after["sink"]) - sum(before["sink"])
    machine = (busy1 - busy0) / max(total1 - total0, 1e-9)
    per_call = (user + system) / max(load.requests, 1) * 1e6
    return load, Cpu(user / wall, system / wall, waited / wall, sink / wall, machine, per_call)


# -- the set-up --------------------------------------------------------------------------------


def claim_namespace(sandboxes: RuncRuntime, stack: contextlib.ExitStack, data: Path) -> Link:
    """A sandbox slot with its namespace and veth pair, and no container: wrk runs in it.

    The slot's record names the namespace before it exists, so a crash of this process leaves
    nothing the next Corral's reaper does not tear down.
    """
    slot = sandboxes.slots.claim()
    link = sandboxes.network.link_for(slot, edit=False)
    sid = f"bench{secrets.token_hex(4)}"
    record = Record(
        slot=slot,
        sandbox_id=sid,
        owner=Owner.me(),
        runc_root=str(sandboxes.runc.root),
        container=f"corral-{sid}",
        bundle=str(data / "bench-bundle"),
        netns=link.netns,
    )
    try:
        sandboxes.slots.write(record)
    except BaseException:
        sandboxes.slots.release(slot)
        raise
    stack.callback(sandboxes.teardown, record)  # namespace, then the slot
    sandboxes.network.create(link)
    return link


def start_run(corral: Corral, stack: contextlib.ExitStack) -> str:
    now = datetime.now(UTC)
    run = corral.store.runs.create(
        Run(
            id=f"run-bench-{secrets.token_hex(6)}",
            environment="bench-bridge",
            snapshot="none",
            entrypoint="bench/bridge.py",
            input="null",
            trigger="bench",
            status=RunStatus.RUNNING,
            created_at=now,
            started_at=now,
        )
    )

    def finish() -> None:
        corral.store.runs.finish(
            run.id, status=str(RunStatus.SUCCEEDED), finished_at=datetime.now(UTC)
        )

    stack.callback(finish)
    return run.id


def check_once(netns: str, url: str, header: str) -> None:
    """One call from the namespace with a clear message, before wrk hides the details."""
    name, _, value = header.partition(": ")
    code = (
        "import sys, urllib.request, urllib.error\n"
        f"r = urllib.request.Request({url!r}, headers={{{name!r}: {value!r}}})\n"
        "try:\n    print(urllib.request.urlopen(r, timeout=5).read().decode())\n"
        "except urllib.error.HTTPError as e:\n    sys.exit(f'{e.code} {e.read().decode()}')\n"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, PY, "-c", code], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0 or '"ok":true' not in proc.stdout:
        raise RuntimeError(f"{url} from {netns}: {proc.stdout}{proc.stderr}".strip())


# -- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx")):
        if shutil.which(tool) is None:
            raise SystemExit(f"bridge bench: needs {tool} (apt-get install {pkg}; make deps)")
    # SIGTERM unwinds like Ctrl-C, so every clean-up below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    env = {**os.environ, "CORRAL_DATA_DIR": str(data)}
    probe = Settings.from_env({k: v for k, v in env.items() if k != "CORRAL_BRIDGE_PORT"})
    with contextlib.ExitStack() as stack:
        stack.callback(discard, data)
        # The gateway address must exist before its ports can be probed.
        Network(probe.network, probe.run_dir).ensure_host()
        gateway = str(probe.network.gateway)
        wanted = os.environ.get("CORRAL_BRIDGE_PORT")
        port, floor = gateway_ports(gateway, int(wanted) if wanted else None)
        corral = Corral(Settings.from_env({**env, "CORRAL_BRIDGE_PORT": str(port)}))
        stack.callback(corral.close)  # last in, first out: the bridge stops before the rest

        # nginx: the upstream, the veth floor and the reverse proxy, on a private prefix.
        secret = f"sk-bench-{secrets.token_hex(16)}"
        upstream, proxy = free_local_port(), free_local_port()
        ngx = data / "nginx"
        ngx.mkdir()
        (ngx / "nginx.conf").write_text(
            NGINX_CONF.format(
                workers=os.cpu_count() or 2,
                dir=ngx,
                upstream=upstream,
                proxy=proxy,
                gateway=gateway,
                floor=floor,
                secret=secret,
            )
        )
        nginx = subprocess.Popen(
            [
                "nginx",
                "-p",
                str(ngx),
                "-e",
                str(ngx / "error.log"),
                "-c",
                str(ngx / "nginx.conf"),
                "-g",
                "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        stack.callback(stop, nginx)
        # nginx opens every listener before serving; the gateway's cannot be probed from here
        # (nftables drops the host's own connections to it): check_once calls it below.
        for p in (upstream, proxy):
            wait_listening("127.0.0.1", p, nginx, ngx / "error.log")

        # Corral: a connection to the upstream, a credential, a live run, a sandbox namespace.
        corral.store.connections.put(CONNECTION, f"http://127.0.0.1:{upstream}", "bearer", None)
        corral.vault.put(USER, CONNECTION, "bearer", {"token": secret})
        run = start_run(corral, stack)
        sandboxes = corral.sandboxes()
        assert isinstance(sandboxes, RuncRuntime)  # the bench claims a slot of its own
        link = claim_namespace(sandboxes, stack, data)
        bridge = corral.bridge()
        if bridge is None:
            raise SystemExit(f"bridge bench: another process took {gateway}:{port}; run again")
        token = mint(
            corral.signing_keys,
            user=USER,
            app="bench",
            session="bench",
            run=run,
            connections=[CONNECTION],
            address=str(link.address),
            lifetime=3600,
        )
        threads = bridge_threads()

        credential = f"Authorization: Bearer {secret}"
        run_token = f"Authorization: Bearer {token}"
        paths = {
            "direct": (f"http://127.0.0.1:{upstream}/ok", credential, None),
            "veth": (f"http://{gateway}:{floor}/ok", credential, link.netns),
            "bridge": (f"http://{gateway}:{port}/{CONNECTION}/ok", run_token, link.netns),
            "nginx": (f"http://127.0.0.1:{proxy}/ok", credential, None),
        }
        check_once(link.netns, paths["veth"][0], credential)
        check_once(link.netns, paths["bridge"][0], run_token)

        plan = [(name, 1) for name in ("direct", "veth", "bridge")]
        plan += [(name, MANY) for name in ("direct", "veth", "bridge", "nginx")]
        loads: dict[tuple[str, int], list[Load]] = {key: [] for key in plan}
        cpus: dict[int, list[Cpu]] = {1: [], MANY: []}
        for _ in range(ROUNDS):
            for name, conns in plan:
                url, header, netns = paths[name]
                wrk(url, conns, WARMUP_S, header, netns)  # pools, caches, the first token check
                if name == "bridge":
                    load, cpu = measured(
                        threads, functools.partial(wrk, url, conns, SECONDS, header, netns)
                    )
                    cpus[conns].append(cpu)
                else:
                    load = wrk(url, conns, SECONDS, header, netns)
                loads[(name, conns)].append(load)
        report(loads, cpus)


def report(loads: dict[tuple[str, int], list[Load]], cpus: dict[int, list[Cpu]]) -> None:
    def med(name: str, conns: int, field: str) -> float:
        return float(statistics.median(getattr(x, field) for x in loads[(name, conns)]))

    def row(name: str, conns: int, label: str) -> str:
        return (
            f"  {label:<48} @{conns:<2}  p50 {med(name, conns, 'p50_ms'):6.3f} ms  "
            f"p99 {med(name, conns, 'p99_ms'):6.3f} ms  "
            f"{med(name, conns, 'rps'):>9,.0f} calls/s"
        )

    print(
        f"bridge: wrk --latency, {SECONDS} s per measurement after {WARMUP_S} s of warm-up, "
        f"{ROUNDS} round(s), medians; -t1 @1 conn, -t2 @{MANY} conns; "
        f"{os.cpu_count()} CPUs shared by client, proxy and upstream"
    )
    labels = {
        "direct": "direct   host -> upstream (127.0.0.1)",
        "veth": "veth     sandbox netns -> nginx on the gateway",
        "bridge": "bridge   sandbox netns -> bridge -> upstream",
        "nginx": "nginx    host -> nginx proxy -> upstream",
    }
    for conns in (1, MANY):
        for name in ("direct", "veth", "bridge", "nginx"):
            if (name, conns) in loads:
                print(row(name, conns, labels[name]))

    def added(base: str, conns: int, field: str) -> float:
        return med("bridge", conns, field) - med(base, conns, field)

    p50_1 = added("direct", 1, "p50_ms")
    print(
        f"bridge: added latency p50 {p50_1:.3f} ms p99 {added('direct', 1, 'p99_ms'):.3f} ms "
        f"@1 conn (target p50 <= 1 ms) {'OK' if p50_1 <= 1.0 else 'MISS'}; "
        f"@{MANY} conns p50 {added('direct', MANY, 'p50_ms'):.3f} ms "
        f"p99 {added('direct', MANY, 'p99_ms'):.3f} ms"
    )
    print(
        f"        of which the proxy alone (bridge - veth floor): @1 p50 "
        f"{added('veth', 1, 'p50_ms'):.3f} ms p99 {added('veth', 1, 'p99_ms'):.3f} ms; "
        f"@{MANY} p50 {added('veth', MANY, 'p50_ms'):.3f} ms "
        f"p99 {added('veth', MANY, 'p99_ms'):.3f} ms"
    )
    print(
        "        (the bridge path crosses one veth pair and nftables; direct and nginx "
        "run on loopback)"
    )
    ours, theirs = med("bridge", MANY, "rps"), med("nginx", MANY, "rps")
    print(
        f"bridge: {ours:,.0f} calls/s @{MANY} conns; nginx {theirs:,.0f} calls/s; "
        f"ratio {ours / theirs:.2f} (target >= 5,000 calls/s) {'OK' if ours >= 5000 else 'MISS'}"
    )
    for conns in (1, MANY):

        def share(field: str, conns: int = conns) -> float:
            return float(statistics.median(getattr(c, field) for c in cpus[conns]))

        print(
            f"bridge: @{conns:<2} event-loop thread {share('loop'):4.0%} of a CPU "
            f"({share('loop_user'):.0%} user, {share('loop_sys'):.0%} kernel; "
            f"{share('per_call_us'):.0f} us per call), runnable without a CPU "
            f"{share('loop_waited'):.0%}; audit thread {share('sink'):.0%}, "
            f"machine {share('machine'):.0%} busy"
        )
    starved = statistics.median(c.loop_waited for c in cpus[1])
    if starved > 0.1:  # one connection leaves CPUs to spare, unless something else runs
        print(
            f"note: other work shared the machine (at 1 connection the bridge waited for a CPU "
            f"{starved:.0%} of the time); these figures are pessimistic"
        )


if __name__ == "__main__":
    main()
