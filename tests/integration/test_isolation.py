"""Isolation, tried from inside: what hostile code in a sandbox can reach, see and change.

Every test boots a real sandbox from the base image and runs a ``python3 -c`` probe (see
``tests.integration.probes``) that attempts the escape and reports exactly how it failed: the
errno, or for the network "timeout" (dropped by nftables) versus "ECONNREFUSED" (answered).
Each attempt is paired with a control where one is needed to make the failure meaningful: the
bridge port that *is* reachable, an allocation that fits, an ioctl that reads, so that a broken
sandbox (no network at all, a probe that never ran) cannot pass for an isolated one.

Only addresses on this machine are ever contacted: the host's own ones, and a network
namespace the egress test creates to stand in for "the internet".
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.config import BRIDGE_PORTS
from corral.context import Corral
from corral.sandbox.spec import MASKED_PATHS, READONLY_PATHS
from tests.conftest import runc_runtime
from tests.hosts import outside_namespace
from tests.integration.probes import (
    PRELUDE,
    Background,
    Listener,
    boot,
    host_ipv4,
    nft_counter,
    probe,
)

pytestmark = [pytest.mark.root, pytest.mark.runc]

# Capability bits (include/uapi/linux/capability.h) that must be in no set, not even bounding.
FORBIDDEN_CAPS = {
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
}


def gateway(corral: Corral) -> str:
    return str(corral.settings.network.gateway)


# -- 1. host files ---------------------------------------------------------------------------

HOST_FILES = r"""
marker = sys.argv[1]
out = {
    "marker": attempt(os.stat, marker),
    "marker_dir": attempt(os.stat, os.path.dirname(marker)),
    "work": attempt(os.stat, "/work"),
    "etc_hostname": open("/etc/hostname").read(),
    "uts_hostname": socket.gethostname(),
    "pid1_argv": open("/proc/1/cmdline", "rb").read().decode(errors="replace").split("\0")[:2],
}
try:
    out["root"] = sorted(os.listdir("/root"))
except OSError as exc:
    out["root"] = ename(exc)
report(out)
"""


def test_host_files_are_not_visible(corral: Corral, env: str, tmp_path: Path) -> None:
    marker = tmp_path / f"host-marker-{secrets.token_hex(4)}"
    marker.write_text("only on the host\n")
    host_hostname = Path("/etc/hostname").read_text()
    host_init = Path("/proc/1/cmdline").read_bytes().decode(errors="replace")
    seen = probe(corral, env, HOST_FILES, marker).report

    assert seen["marker"] == "ENOENT", seen
    assert seen["marker_dir"] == "ENOENT", seen
    assert seen["work"] == "ENOENT", seen
    # /root is the image's (root-owned, 0700): uid 1000 cannot list it. Were it the host's
    # and readable, it would show the host's own dotfiles.
    host_only = set(os.listdir("/root")) - image_entries(corral, env, "root")
    if isinstance(seen["root"], list):
        assert not host_only & set(seen["root"]), seen["root"]
    else:
        assert seen["root"] == "EACCES", seen
    # The sandbox's /etc/hostname is the image's file; its UTS name is Corral's.
    assert seen["etc_hostname"] == image_file(corral, env, "etc/hostname"), seen
    assert seen["etc_hostname"] != host_hostname
    assert seen["uts_hostname"] == "sandbox"
    # pid 1 inside is the probe itself, not the host's init.
    assert seen["pid1_argv"] == ["python3", "-c"], seen
    assert host_init.split("\0")[:2] != ["python3", "-c"], host_init


def image_layers(corral: Corral, env: str) -> list[Path]:
    image = corral.envs.images.load(corral.envs.get(env).head)
    return list(corral.envs.images.unpacked(image))


def image_entries(corral: Corral, env: str, directory: str) -> set[str]:
    names: set[str] = set()
    for layer in image_layers(corral, env):
        if (layer / directory).is_dir():
            names |= set(os.listdir(layer / directory))
    return names


def image_file(corral: Corral, env: str, path: str) -> str:
    for layer in image_layers(corral, env):  # topmost first
        if (layer / path).is_file():
            return (layer / path).read_text()
    raise AssertionError(f"the image has no /{path}")


# -- 2. host processes -----------------------------------------------------------------------

PROCESSES = r"""
host_pid = int(sys.argv[1])
report({
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "me": os.getpid(),
    "host_pid_dir": attempt(os.stat, f"/proc/{host_pid}"),
    "kill_host_pid": attempt(os.kill, host_pid, 0),
})
"""


def test_host_processes_are_not_visible(corral: Corral, env: str) -> None:
    host_pid = os.getpid()
    assert host_pid > 1
    seen = probe(corral, env, PROCESSES, host_pid).report

    assert seen["me"] == 1, seen  # a pid namespace of its own, the probe its init
    assert seen["pids"] == [1], seen
    assert seen["host_pid_dir"] == "ENOENT", seen
    assert seen["kill_host_pid"] == "ESRCH", seen


# -- 3. host services ------------------------------------------------------------------------

HOST_SERVICES = r"""
gw, abstract = sys.argv[1], sys.argv[2]
targets = [tuple(t.rsplit(":", 1)) for t in sys.argv[3:]]
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
report({
    "address": my_address(gw),
    "connect": connect_all(targets),
    # Abstract unix sockets belong to the network namespace: the host's are not ours.
    "abstract_unix": attempt(u.connect, "\0" + abstract),
})
"""


def spare_bridge_port(corral: Corral) -> int:
    """A port of the sandbox network's bridge range that no bridge holds right now: these tests
    listen on it themselves (the session's real bridge may hold its own port)."""
    import socket

    for port in BRIDGE_PORTS:
        if port == corral.settings.network.bridge_port:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((gateway(corral), port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port in the bridge range")


@pytest.mark.parametrize("kind", ["run", "edit"])
def test_host_services_are_unreachable_but_the_bridge_port_is(
    corral: Corral, env: str, kind: str
) -> None:
    gw = gateway(corral)
    bridge_port = spare_bridge_port(corral)
    _, host_addr = host_ipv4()
    abstract = f"corral-isolation-{secrets.token_hex(4)}"
    with (
        Listener("127.0.0.1") as loopback,
        Listener("0.0.0.0") as wildcard,
        Listener(gw, bridge_port) as bridge,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        unix.bind("\0" + abstract)
        unix.listen(1)
        targets = {
            "loopback": f"127.0.0.1:{loopback.port}",
            "gateway_loopback_port": f"{gw}:{loopback.port}",
            "gateway_wildcard_port": f"{gw}:{wildcard.port}",
            "host_wildcard_port": f"{host_addr}:{wildcard.port}",
            "bridge": f"{gw}:{bridge_port}",
        }
        dropped = nft_counter("from_sandbox", "counter packets")
        seen = probe(
            corral, env, HOST_SERVICES, gw, abstract, *targets.values(), edit=kind == "edit"
        ).report
        dropped = nft_counter("from_sandbox", "counter packets") - dropped
    result = {name: seen["connect"][target] for name, target in targets.items()}
    print(f"{result=} {dropped=} {loopback.peers=} {wildcard.peers=} {bridge.peers=}")

    # 127.0.0.1 inside is the sandbox's own loopback, where nothing listens: refused at once.
    assert result["loopback"] == "ECONNREFUSED", result
    assert seen["abstract_unix"] == "ECONNREFUSED", seen
    # Everything on the host but the bridge port is silently dropped by nftables.
    assert result["gateway_loopback_port"] == "timeout", result
    assert result["gateway_wildcard_port"] == "timeout", result
    assert result["host_wildcard_port"] == "timeout", result
    assert dropped >= 3, f"the sandbox's catch-all drop counted {dropped} packets"
    assert loopback.peers == [] and wildcard.peers == [], (loopback.peers, wildcard.peers)
    # The control: the one port a sandbox may reach works, and the host sees its address.
    assert result["bridge"] == "connected", result
    assert bridge.peers == [seen["address"]], (bridge.peers, seen["address"])


IPV6 = r"""
gw, port = sys.argv[1], int(sys.argv[2])
def eth0_link_local():
    for line in open("/proc/net/if_inet6"):
        addr, _, _, scope, flags, name = line.split()
        if name == "eth0" and addr.startswith("fe80"):
            return int(flags, 16)
deadline = time.monotonic() + 5
while time.monotonic() < deadline and (eth0_link_local() is None or eth0_link_local() & 0x40):
    time.sleep(0.1)  # IFA_F_TENTATIVE: duplicate address detection is still running
# The host end of the veth: its MAC from ARP, its link-local address by EUI-64.
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
probe.sendto(b"", (gw, 9))
mac = None
for _ in range(50):
    for line in open("/proc/net/arp").read().splitlines()[1:]:
        fields = line.split()
        if fields[0] == gw and fields[3] != "00:00:00:00:00:00":
            mac = fields[3]
    if mac:
        break
    time.sleep(0.05)
b = [int(x, 16) for x in mac.split(":")]
host_ll = "fe80::%x:%02xff:fe%02x:%x" % ((b[0] ^ 2) << 8 | b[1], b[2], b[3], b[4] << 8 | b[5])
report({"address": my_address(gw), "host_ll": host_ll, "ll_flags": eth0_link_local()})
sys.stdin.readline()  # the host checks host_ll before we try it
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(1.5)
try:
    s.connect((host_ll, port, 0, socket.if_nametoindex("eth0")))
    result = "connected"
except socket.timeout:
    result = "timeout"
except OSError as exc:
    result = ename(exc)
report({"connect": result})
"""


def test_host_is_unreachable_over_ipv6(corral: Corral, env: str) -> None:
    """A sandbox gets an IPv6 link-local address for free; the host end of its veth has one
    too, and a host service on [::] would answer there were IPv6 not dropped."""
    gw = gateway(corral)
    with Listener("::") as wildcard:
        sandbox = Background(corral, env, IPV6, gw, wildcard.port)
        try:
            ready = sandbox.report()
            slot = int(ipaddress.ip_address(ready["address"])) - int(ipaddress.ip_address(gw))
            iface = runc_runtime(corral).network.link_for(slot, edit=False).host_iface
            shown = subprocess.run(
                ["ip", "-6", "-o", "addr", "show", "dev", iface, "scope", "link"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            if "inet6" not in shown:
                pytest.skip(f"{iface} has no IPv6 link-local address: nothing to reach")
            host_ll = shown[shown.index("inet6") + 1].split("/")[0]
            sandbox.send("go")
            seen = sandbox.report()
        finally:
            sandbox.finish()
    print(f"{host_ll=} {wildcard.peers=}")

    assert ready["ll_flags"] is not None and not ready["ll_flags"] & 0x40, ready  # usable
    assert ipaddress.ip_address(ready["host_ll"]) == ipaddress.ip_address(host_ll), ready
    # Dropped (neighbour discovery included): a timeout, or no neighbour at all.
    assert seen["connect"] in ("timeout", "EHOSTUNREACH"), seen
    assert wildcard.peers == [], wildcard.peers


# -- 4. other sandboxes ----------------------------------------------------------------------

SERVER = r"""
import select
gw, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(16)
me = my_address(gw)
control = connect(me, port)  # the listener answers on the address the others will try
srv.accept()[0].close()
report({"address": me, "control": control})
peers = []
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    ready = select.select([srv, sys.stdin], [], [], 0.5)[0]
    if srv in ready:
        conn, peer = srv.accept()
        peers.append(peer[0])
        conn.close()
    if sys.stdin in ready and not os.read(0, 1):
        break  # the host closed our stdin: the client is done
report({"address": me, "peers": peers})
"""

CLIENT = r"""
gw, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
report({"address": my_address(gw), "connect": connect(target, port)})
"""


@pytest.mark.parametrize("client", ["run", "edit"])
def test_another_sandbox_is_unreachable(corral: Corral, env: str, client: str) -> None:
    gw = gateway(corral)
    server = Background(corral, env, SERVER, gw, 8000)
    try:
        ready = server.report()
        assert ready["control"] == "connected", ready
        rule = 'iifname "cr*" counter' if client == "run" else 'oifname "cr*" counter'
        dropped = nft_counter("forward", rule)
        seen = probe(corral, env, CLIENT, gw, ready["address"], 8000, edit=client == "edit")
        dropped = nft_counter("forward", rule) - dropped
    finally:
        result = server.finish()
    final = server.report()
    print(f"{client=} {dropped=} server={result}")

    assert result.address == ready["address"], (result.address, ready)
    assert seen.report["address"] != ready["address"]
    assert seen.report["connect"] == "timeout", seen.report
    assert final["peers"] == [], final
    assert dropped >= 1, f"forward rule {rule!r} counted {dropped} packets"


# -- 5. egress -------------------------------------------------------------------------------

OUTSIDE_SERVER = r"""
import json, socket, sys, select, os
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
peers = []
while True:
    ready = select.select([srv, sys.stdin], [], [])[0]
    if srv in ready:
        conn, peer = srv.accept()
        peers.append(peer[0])
        conn.close()
    if sys.stdin in ready and not os.read(0, 1):
        break
print(json.dumps(peers), flush=True)
"""


@dataclass
class Outside:
    """A host on "the internet" that lives on this machine: a network namespace of our own,
    reached through a veth, with a documentation address (TEST-NET-2) routed only to it."""

    address: str
    near: str  # the host's own address on the link to it
    port: int
    server: subprocess.Popen[str]

    def peers(self) -> list[str]:
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.close()
        line = self.server.stdout.readline()
        self.server.wait(timeout=10)
        return list(json.loads(line))


@pytest.fixture
def outside() -> Iterator[Outside]:
    near, address = "198.51.100.1", "198.51.100.7"  # the host's end, the outside host
    # Replies to anyone (a sandbox included, were it let through) go back via the host.
    with outside_namespace("iso", near, address) as (netns, _):
        server = subprocess.Popen(
            ["ip", "netns", "exec", netns, "python3", "-c", OUTSIDE_SERVER, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            yield Outside(address, near, port, server)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            for pipe in (server.stdin, server.stdout):
                if pipe is not None:
                    pipe.close()


EGRESS = r"""
gw = sys.argv[1]
targets = [tuple(t.rsplit(":", 1)) for t in sys.argv[2:]]
report({"address": my_address(gw), "connect": connect_all(targets)})
"""


def test_a_run_has_no_egress(corral: Corral, env: str, outside: Outside) -> None:
    gw = gateway(corral)
    # The control: the outside host answers (from the host itself), so a timeout is a drop.
    with socket.create_connection((outside.address, outside.port), timeout=3):
        pass
    _, host_addr = host_ipv4()
    with Listener(host_addr) as on_host:
        targets = [f"{outside.address}:{outside.port}", f"{host_addr}:{on_host.port}"]
        forwarded = nft_counter("forward", 'iifname "cr*" counter')
        seen = probe(corral, env, EGRESS, gw, *targets).report
        forwarded = nft_counter("forward", 'iifname "cr*" counter') - forwarded
    peers = outside.peers()
    print(f"outside={outside.address}:{outside.port} {peers=} {on_host.peers=} {forwarded=}")

    assert seen["connect"][targets[0]] == "timeout", seen
    assert seen["connect"][targets[1]] == "timeout", seen
    assert peers == [outside.near], peers  # only the host's control connection
    assert on_host.peers == [], on_host.peers
    assert forwarded >= 1, f"the forward drop for runs counted {forwarded} packets"


# -- 6. memory -------------------------------------------------------------------------------

ALLOCATE = r"""
n = int(sys.argv[1])
block = b"\x01" * n  # bytes * int fills every byte: every page is touched
report({"allocated": len(block)})
"""


def test_memory_limit_kills_the_hog(corral: Corral, env: str) -> None:
    limit = corral.settings.limits.memory_bytes
    small = boot(corral, env, "python3", "-c", PRELUDE + ALLOCATE, str(64 * 1024 * 1024))
    assert small.exit_code == 0, small.stderr
    assert small.report == {"allocated": 64 * 1024 * 1024}

    hog = boot(corral, env, "python3", "-c", PRELUDE + ALLOCATE, str(2 * limit))
    assert hog.exit_code == 128 + 9, (hog.exit_code, hog.stdout, hog.stderr[-500:])
    assert "allocated" not in hog.stdout
    assert "MemoryError" not in hog.stderr
    # The kernel says who did it: the memory cgroup of this very sandbox.
    kernel_log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    print(f"64 MiB -> exit {small.exit_code}; {2 * limit} bytes -> exit {hog.exit_code}")
    print(*[line for line in kernel_log.splitlines() if hog.result.sandbox_id in line], sep="\n")
    assert f"oom_memcg=/corral/corral-{hog.result.sandbox_id}" in kernel_log


# -- 7. pids ---------------------------------------------------------------------------------

FORK_BOMB = r"""
limit = int(sys.argv[1])
forked, error = 0, None
try:
    while forked < 2 * limit:
        if os.fork() == 0:
            try:
                time.sleep(60)  # pid 1 exiting kills the whole pid namespace
            finally:
                os._exit(0)
        forked += 1
except OSError as exc:
    error = ename(exc)
report({"forked": forked, "error": error})
os._exit(0)
"""


def test_pids_limit_stops_a_fork_bomb(corral: Corral, env: str) -> None:
    limit = corral.settings.limits.pids
    outcome = probe(corral, env, FORK_BOMB, limit)
    seen = outcome.report

    assert seen["error"] == errno.errorcode[errno.EAGAIN], seen
    # pid 1 counts too: the bomb stops just short of the cgroup's pids.max.
    assert limit - 8 <= seen["forked"] < limit, seen
    # Tear-down: not one process, cgroup, namespace, bundle or slot is left behind.
    sid = outcome.result.sandbox_id
    container = f"corral-{sid}"
    slot = int(ipaddress.ip_address(outcome.result.address)) - int(corral.settings.network.gateway)
    leftovers = [p for p in Path("/sys/fs/cgroup").glob(f"*/corral/{container}")]
    assert leftovers == [], leftovers
    assert not (corral.settings.data_dir / "sandboxes" / sid).exists()
    assert not (corral.settings.run_dir / "runc" / container).exists()
    assert not (corral.settings.run_dir / "slots" / str(slot)).exists()
    assert not Path(f"/run/netns/corral-{slot}").exists()
    stragglers = []
    for cgroup in Path("/proc").glob("[0-9]*/cgroup"):
        try:
            if container in cgroup.read_text():
                stragglers.append(cgroup.parent.name)
        except OSError:
            pass
    assert stragglers == [], f"processes of {container} outlived it: {stragglers}"


# -- 8. mounting and namespaces --------------------------------------------------------------

MOUNT = r"""
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    ctypes.set_errno(0)
    ret = fn(*args)
    return [ret, errno.errorcode.get(ctypes.get_errno(), "OK")]
os.makedirs("/tmp/mnt", exist_ok=True)
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
report({
    "mount": call(libc.mount, b"none", b"/tmp/mnt", b"tmpfs", ctypes.c_ulong(0), None),
    "unshare_user_ns": call(libc.unshare, CLONE_NEWUSER | CLONE_NEWNS),
    "unshare_user": call(libc.unshare, CLONE_NEWUSER),
})
"""


def test_mount_and_unshare_are_refused(corral: Corral, env: str) -> None:
    seen = probe(corral, env, MOUNT).report

    assert seen["mount"] == [-1, "EPERM"], seen
    assert seen["unshare_user_ns"] == [-1, "EPERM"], seen
    # Unprivileged user namespaces are the usual first step of a container escape.
    assert seen["unshare_user"] == [-1, "EPERM"], seen


# -- 9. chattr -------------------------------------------------------------------------------

CHATTR = r"""
import fcntl, shutil, struct
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10
path = os.path.expanduser("~/mine")
with open(path, "w") as f:
    f.write("x")
out = {"which": shutil.which("chattr"), "owner": os.stat(path).st_uid}
fd = os.open(path, os.O_RDONLY)
try:
    out["get"] = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
except OSError as exc:
    out["get"] = ename(exc)
out["set_immutable"] = attempt(fcntl.ioctl, fd, FS_IOC_SETFLAGS, struct.pack("i", FS_IMMUTABLE_FL))
out["flags_after"] = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
report(out)
"""


def test_files_cannot_be_made_immutable(corral: Corral, env: str) -> None:
    seen = probe(corral, env, CHATTR).report

    assert seen["which"] is None, seen
    assert seen["owner"] == 1000, seen
    # The control: the filesystem does answer the flags ioctl, so EPERM is about privilege.
    assert isinstance(seen["get"], int), seen
    assert seen["set_immutable"] == "EPERM", seen
    assert not seen["flags_after"] & 0x10, seen


# -- 10. raw sockets -------------------------------------------------------------------------

RAW_SOCKETS = r"""
def sock(*args):
    try:
        socket.socket(*args).close()
        return "ok"
    except OSError as exc:
        return ename(exc)
report({
    "inet_raw_icmp": sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "packet_raw": sock(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)),
    "inet_ping": sock(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "inet_tcp": sock(socket.AF_INET, socket.SOCK_STREAM),
})
"""


def test_raw_sockets_are_refused(corral: Corral, env: str) -> None:
    seen = probe(corral, env, RAW_SOCKETS).report

    assert seen["inet_raw_icmp"] == "EPERM", seen
    assert seen["packet_raw"] == "EPERM", seen
    # Unprivileged ICMP "ping" sockets are off in a fresh netns (ping_group_range "1 0").
    assert seen["inet_ping"] == "EACCES", seen
    assert seen["inet_tcp"] == "ok", seen  # the control: sockets as such work


# -- 11. privileges --------------------------------------------------------------------------

PRIVILEGES = r"""
import stat
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
status = {k: v.strip() for k, v in status.items()}
def write(path, data=b"x"):
    try:
        with open(path, "wb") as f:
            f.write(data)
        return "ok"
    except OSError as exc:
        return ename(exc)
def readonly(path):
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError as exc:
        return ename(exc)
masked_paths, readonly_paths = (json.loads(a) for a in sys.argv[1:3])
# cgroup v1: /sys/fs/cgroup is a private tmpfs (0555), each controller a read-only mount in it.
readonly_paths += sorted(os.path.join("/sys/fs/cgroup", c) for c in os.listdir("/sys/fs/cgroup"))
def masked(path):
    # What is at a masked path: nothing, /dev/null (with what reading it yields), or a dir.
    try:
        st = os.stat(path)
    except OSError as exc:
        return ename(exc)
    if stat.S_ISDIR(st.st_mode):
        return {"dir": os.listdir(path)}
    out = {"rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)] if stat.S_ISCHR(st.st_mode)
           else None}
    try:
        with open(path, "rb") as f:
            out["read"] = len(f.read(4096))
    except OSError as exc:
        out["read"] = ename(exc)
    return out
libc = ctypes.CDLL(None, use_errno=True)
ctypes.set_errno(0)
libc.sethostname(b"pwned", 5)
report({
    "uid": status["Uid"].split(), "gid": status["Gid"].split(),
    "caps": {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    "no_new_privs": status["NoNewPrivs"], "seccomp": status["Seccomp"],
    "masked": {p: masked(p) for p in masked_paths},
    "readonly": {p: readonly(p) for p in readonly_paths},
    "write_hostname_sysctl": write("/proc/sys/kernel/hostname", b"pwned"),
    "write_sysrq": write("/proc/sysrq-trigger", b"h"),
    "write_sys": write("/sys/kernel/uevent_helper", b"/tmp/x"),
    "write_cgroup": write("/sys/fs/cgroup/pids/pids.max", b"max"),
    "sethostname": errno.errorcode.get(ctypes.get_errno(), "OK"),
    "hostname": socket.gethostname(),
})
"""


def test_no_privileges(corral: Corral, env: str) -> None:
    readonly = [*READONLY_PATHS, "/sys"]
    seen = probe(corral, env, PRIVILEGES, json.dumps(MASKED_PATHS), json.dumps(readonly)).report

    assert seen["uid"] == ["1000"] * 4 and seen["gid"] == ["1000"] * 4, seen
    caps = seen["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapInh"] == caps["CapAmb"] == 0, caps
    held = {name for name, bit in FORBIDDEN_CAPS.items() if caps["CapBnd"] >> bit & 1}
    assert held == set(), f"bounding set holds {held}"
    assert seen["no_new_privs"] == "1" and seen["seccomp"] == "2", seen
    # Each masked path is /dev/null (files) or an empty directory bind-mounted over the real
    # one, or absent from this kernel altogether (this host has no CONFIG_PROC_KCORE).
    masked = seen["masked"]
    assert masked["/proc/kcore"] in ("ENOENT", {"rdev": [1, 3], "read": 0}), masked
    for path, found in masked.items():
        assert found in ("ENOENT", {"rdev": [1, 3], "read": 0}, {"dir": []}), (path, found)
    covered = [p for p, found in masked.items() if found != "ENOENT"]
    assert covered, f"no masked path exists on this kernel, so none was checked: {masked}"
    # Read-only mounts (as statvfs reports them); a path this kernel lacks is "ENOENT".
    ro = seen["readonly"]
    assert {p: v for p, v in ro.items() if v != "ENOENT"} == {
        p: True for p, v in ro.items() if v != "ENOENT"
    }, ro
    assert ro["/proc/sys"] is True and ro["/sys"] is True, ro
    assert [p for p in ro if p.startswith("/sys/fs/cgroup/")], ro  # the controllers were seen
    # open(O_WRONLY|O_CREAT|O_TRUNC) meets the read-only mount before file permissions.
    assert seen["write_hostname_sysctl"] == "EROFS", seen
    assert seen["write_sys"] == "EROFS", seen
    assert seen["write_cgroup"] == "EROFS", seen
    assert seen["write_sysrq"] in ("EROFS", "ENOENT"), seen  # this kernel has no MAGIC_SYSRQ
    assert seen["sethostname"] == "EPERM" and seen["hostname"] == "sandbox", seen


# -- 12. spoofing ----------------------------------------------------------------------------

HOLDER = r"""
gw = sys.argv[1]
report({"address": my_address(gw)})
sys.stdin.read()  # hold the address until the host says stop
"""

SPOOF = r"""
import fcntl, struct
gw, bridge, victim = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SIOCSIFADDR, IP_TRANSPARENT = 0x8916, 19
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifreq = struct.pack("16sH2s4s8s", b"eth0", socket.AF_INET, b"\0\0",
                    socket.inet_aton(victim), b"\0" * 8)
t = socket.socket()
report({
    "address": my_address(gw),
    "set_address": attempt(fcntl.ioctl, s.fileno(), SIOCSIFADDR, ifreq),
    "ip_transparent": attempt(t.setsockopt, socket.IPPROTO_IP, IP_TRANSPARENT, 1),
    "spoofed_connect": connect(gw, bridge, source=victim),
    "honest_connect": connect(gw, bridge),
})
"""


def test_a_sandbox_cannot_take_another_address(corral: Corral, env: str) -> None:
    gw = gateway(corral)
    bridge_port = spare_bridge_port(corral)
    victim = Background(corral, env, HOLDER, gw)
    try:
        victim_address = victim.report()["address"]
        with Listener(gw, bridge_port) as bridge:
            seen = probe(corral, env, SPOOF, gw, bridge_port, victim_address).report
    finally:
        victim.finish()

    assert seen["address"] != victim_address
    assert seen["set_address"] == "EPERM", seen  # SIOCSIFADDR needs CAP_NET_ADMIN
    assert seen["ip_transparent"] == "EPERM", seen  # so does sending from any address
    # IP_FREEBIND lets the probe bind the victim's address, but without IP_TRANSPARENT the
    # kernel will not route a packet whose source is not local: nothing leaves the sandbox.
    assert seen["spoofed_connect"] == "ENETUNREACH", seen
    # The control: the bridge port answers, and only ever sees the prober's own address.
    assert seen["honest_connect"] == "connected", seen
    assert bridge.peers == [seen["address"]], (bridge.peers, victim_address)


# -- 13. nothing persists between runs -------------------------------------------------------

WRITE = r"""
paths = ["/home/user/left-behind", "/tmp/left-behind", "/var/tmp/left-behind"]
for p in paths:
    with open(p, "w") as f:
        f.write("from the first run")
report({p: os.path.exists(p) for p in paths})
"""

READ = r"""
paths = ["/home/user/left-behind", "/tmp/left-behind", "/var/tmp/left-behind"]
report({p: attempt(os.stat, p) for p in paths})
"""


def test_a_run_leaves_nothing_for_the_next(corral: Corral, env: str) -> None:
    written = probe(corral, env, WRITE).report
    assert all(written.values()), written
    seen = probe(corral, env, READ).report
    assert seen == {p: "ENOENT" for p in written}, seen
