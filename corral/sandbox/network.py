"""Sandbox networking: one network namespace and one veth per sandbox, and the nftables table.

The only module that runs ``ip`` and ``nft``. The design (docs/design/sandbox-network.md):

* Every sandbox gets a /32 address from the sandbox subnet and a veth pair: ``eth0`` in its own
  namespace, ``cr<slot>`` (a run) or ``ce<slot>`` (an edit session) on the host, with a host route
  to that /32 and nothing else. There is no bridge: sandboxes share no link, so anything between
  them is routed through the host's forward hook, where it is dropped.
* The gateway address lives on ``corral0``, a Linux bridge with no ports (this kernel has no
  ``dummy`` driver), so the bridge service can bind it before any sandbox exists. No veth is
  ever enslaved to it.
* One static ``inet corral`` table holds every rule. It names interfaces by prefix, so booting a
  sandbox adds no rule and tearing one down removes none: no rule can outlive its sandbox.
  A run may reach the bridge ports on the gateway and nothing else; nothing but a sandbox
  interface may reach a bridge port at all (not the host's loopback, not another
  namespace). An edit session may also reach the host's DNS resolvers and ports 80/443
  outside private ranges (package registries).
  A source address that does not route back through the interface it came from is dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.config import BRIDGE_PORTS, NetworkSettings
from corral.errors import NetworkError

TABLE = "corral"
DUMMY = "corral0"
NETNS_DIR = Path("/run/netns")
_PRIVATE = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


@dataclass(frozen=True)
class Link:
    """A sandbox's place on the network."""

    slot: int
    netns: str
    host_iface: str
    address: ipaddress.IPv4Address

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


class Network:
    def __init__(self, settings: NetworkSettings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self._ready = False

    def capacity(self) -> int:
        """How many sandboxes the subnet holds: every host address but the gateway."""
        return self.settings.subnet.num_addresses - 3

    def link_for(self, slot: int, edit: bool) -> Link:
        if not 1 <= slot <= self.capacity():
            raise ValueError(f"slot {slot} outside 1..{self.capacity()}")
        address = self.settings.gateway + slot
        prefix = "ce" if edit else "cr"
        return Link(slot, f"corral-{slot}", f"{prefix}{slot:x}", address)

    # -- host-wide set-up, once per process ---------------------------------------------------

    def ensure_host(self) -> None:
        """The gateway anchor interface, IPv4 forwarding, and the nftables table (if changed)."""
        if self._ready:
            return
        gw = self.settings.gateway
        if not Path(f"/sys/class/net/{DUMMY}").exists():
            _ip_batch([f"link add {DUMMY} type bridge"], tolerate="File exists")
        _ip_batch([f"addr replace {gw}/32 dev {DUMMY}", f"link set {DUMMY} up"])
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        ruleset = self.ruleset()
        stamp = self.run_dir / "nft.sha256"
        want = hashlib.sha256(ruleset.encode()).hexdigest()
        installed = _run(["nft", "list", "table", "inet", TABLE], check=False).returncode == 0
        if not (installed and stamp.exists() and stamp.read_text() == want):
            _run(["nft", "-f", "-"], stdin=ruleset)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(want)
        self._ready = True

    def ruleset(self) -> str:
        s = self.settings
        resolvers = ", ".join(str(r) for r in host_resolvers()) or "127.0.0.1"
        denied = ", ".join([*_PRIVATE, *host_networks(), str(s.subnet)])
        ports = f"{BRIDGE_PORTS.start}-{BRIDGE_PORTS.stop - 1}"
        return f"""
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "cr*" jump from_sandbox
        iifname "ce*" jump from_sandbox
        ip daddr {s.gateway} tcp dport {ports} counter drop
    }}
    chain from_sandbox {{
        meta nfproto ipv6 counter drop
        fib saddr . iif oif missing counter drop
        ct state established,related accept
        ip daddr {s.gateway} tcp dport {ports} accept
        counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "cr*" counter drop
        oifname "cr*" counter drop
        iifname "ce*" jump edit_egress
        oifname "ce*" ct state established,related accept
        oifname "ce*" counter drop
    }}
    chain edit_egress {{
        meta nfproto ipv6 counter drop
        fib saddr . iif oif missing counter drop
        ip daddr {{ {resolvers} }} meta l4proto {{ tcp, udp }} th dport 53 accept
        ip daddr {{ {denied} }} counter drop
        tcp dport {{ 80, 443 }} accept
        counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        iifname "ce*" oifname != "ce*" masquerade
    }}
}}
"""

    # -- per sandbox -------------------------------------------------------------------------

    def create(self, link: Link) -> None:
        """Namespace, veth pair, addresses and routes: two ``ip -batch`` calls."""
        gw = self.settings.gateway
        _ip_batch(
            [
                f"netns add {link.netns}",
                f"link add {link.host_iface} type veth peer name eth0 netns {link.netns}",
                f"link set {link.host_iface} up",
                f"route add {link.address}/32 dev {link.host_iface} src {gw}",
            ]
        )
        _ip_batch(
            [
                "link set lo up",
                f"addr add {link.address}/32 dev eth0",
                "link set eth0 up",
                f"route add {gw}/32 dev eth0",
                f"route add default via {gw} dev eth0",
            ],
            netns=link.netns,
        )

    def destroy(self, netns: str) -> None:
        """Delete the namespace; the kernel destroys the veth pair with it. Idempotent."""
        if (NETNS_DIR / netns).exists():
            _ip_batch([f"netns delete {netns}"], tolerate="No such file")


def host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[ipaddress.IPv4Address]:
    """The host's IPv4 nameservers that a sandbox could reach (loopback ones cannot be)."""
    out = []
    try:
        lines = resolv_conf.read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv4Address) and not addr.is_loopback:
                out.append(addr)
    return out


def host_networks() -> list[str]:
    """The host's directly connected IPv4 networks: its neighbours are never an edit's target."""
    proc = _run(["ip", "-4", "-o", "addr", "show"], check=False)
    nets = set()
    for line in proc.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            iface = ipaddress.ip_interface(fields[fields.index("inet") + 1])
            if not iface.ip.is_loopback:
                nets.add(str(iface.network))
    return sorted(nets)


def _ip_batch(commands: list[str], netns: str | None = None, tolerate: str = "") -> None:
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = _run(argv, stdin="\n".join(commands) + "\n", check=False)
    if proc.returncode != 0 and not (tolerate and tolerate in proc.stderr):
        raise NetworkError(argv + commands, proc.returncode, proc.stderr)


def _run(
    argv: list[str], stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(argv, proc.returncode, proc.stderr)
    return proc
