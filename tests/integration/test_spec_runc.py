"""runtime_config() under the real runc: the isolation it describes is what a sandbox gets.

The rootfs is a throwaway directory whose /usr is the host's, bind-mounted read-only
through a BindMount, so the probe can use the host's /usr/bin/python3 without a base image.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import SandboxLimits
from corral.sandbox.spec import (
    BOUNDING_CAPABILITIES,
    MASKED_PATHS,
    BindMount,
    ProcessSpec,
    runtime_config,
)

pytestmark = [pytest.mark.root, pytest.mark.runc]

PYTHON = "/usr/bin/python3"
LIMITS = SandboxLimits(memory_bytes=96 * 1024 * 1024, pids=64, cpu_quota_us=50_000)

# Bit numbers of the bounding capabilities (include/uapi/linux/capability.h).
_CAP_BITS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_AUDIT_WRITE": 29,
}

# Runs inside the sandbox and prints one JSON object describing what it could and could
# not do. Raw syscall numbers are x86_64's; the test is skipped elsewhere.
PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def raw(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if ret == 0 and nr == 56:  # a clone that unexpectedly succeeded: this is the child
        os._exit(0)
    return errno.errorcode.get(ctypes.get_errno(), "OK") if ret == -1 else "OK"

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split()[1]

def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return "error: " + exc.strerror

def masked(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "absent"
    if os.path.isdir(path):
        return ["dir", sorted(os.listdir(path))]
    return ["file", os.major(st.st_rdev), os.minor(st.st_rdev), read(path)]

def run(*argv):
    return subprocess.run(argv, capture_output=True).returncode

box = []
worker = threading.Thread(target=lambda: box.append("ran"))
worker.start()
worker.join()

flags = {}
for path in ("/usr", "/"):
    f = os.statvfs(path).f_flag
    flags[path] = {"ro": bool(f & os.ST_RDONLY)}
flags["/usr"]["nosuid"] = bool(os.statvfs("/usr").f_flag & os.ST_NOSUID)
f = os.statvfs("/data/sub").f_flag
flags["/data/sub"] = {
    "ro": bool(f & os.ST_RDONLY), "nosuid": bool(f & os.ST_NOSUID), "nodev": bool(f & os.ST_NODEV),
}

MASKED_PATHS = %s

print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cap_eff": status("CapEff"), "cap_prm": status("CapPrm"), "cap_inh": status("CapInh"),
    "cap_bnd": status("CapBnd"), "cap_amb": status("CapAmb"),
    "no_new_privs": status("NoNewPrivs"), "seccomp": status("Seccomp"),
    "hostname": socket.gethostname(),
    "netns_inode": os.stat("/proc/self/ns/net").st_ino,
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "masked": {path: masked(path) for path in MASKED_PATHS},
    "mem_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "memsw_limit": read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    "pids_max": read("/sys/fs/cgroup/pids/pids.max"),
    "cfs_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    "nofile": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE),
    "thread": box, "true_rc": run("/usr/bin/true"),
    "unshare_rc": run("/usr/bin/unshare", "-U", "true"),
    "mount_rc": run("/usr/bin/mount", "-t", "tmpfs", "none", "/tmp"),
    "mounts_ro": flags,
    "usr_write": run("/usr/bin/touch", "/usr/corral-probe"),
    "tmp_write": run("/usr/bin/touch", "/tmp/corral-probe"),
    "sys": {
        "unshare_0": raw(272, 0),
        "unshare_newuser": raw(272, 0x10000000),
        "setns": raw(308, 0, 0),
        "mount": raw(165, 0, 0, 0, 0, 0),
        "umount2": raw(166, 0, 0),
        "pivot_root": raw(155, 0, 0),
        "chroot": raw(161, 0),
        "ptrace_traceme": raw(101, 0, 0, 0, 0),
        "keyctl": raw(250, 0, 0, 0, 0, 0),
        "bpf": raw(321, 0, 0, 0),
        "perf_event_open": raw(298, 0, 0, 0, 0, 0),
        "userfaultfd": raw(323, 0),
        "open_by_handle_at": raw(304, 0, 0, 0),
        "io_uring_setup": raw(425, 0, 0),
        "clone_newuser": raw(56, 0x10000000 | 17, 0, 0, 0, 0),
        "clone_newns": raw(56, 0x00020000 | 17, 0, 0, 0, 0),
        "clone3": raw(435, 0, 0),
        "personality_query": raw(135, 0xFFFFFFFF),
        "personality_no_aslr": raw(135, 0x0040000),
        "quotactl_fd": raw(443, 0, 0, 0, 0),
        "fchmodat2": raw(452, -100, 0, 0, 0),
        "mseal": raw(462, 0, 0, 0),
    },
}))
"""


def _need(what: str, reason: str) -> None:
    required = os.environ.get("CORRAL_TEST_REQUIRE", "").replace(",", " ").split()
    if what in required:
        pytest.fail(f"CORRAL_TEST_REQUIRE lists {what!r} but {reason}")
    pytest.skip(reason)


@pytest.fixture
def netns() -> Iterator[Path]:
    if os.geteuid() != 0:
        _need("root", "this test needs root")
    if shutil.which("runc") is None:
        _need("runc", "runc is not installed")
    if platform.machine() != "x86_64" or not Path(PYTHON).is_file():
        _need("runc", f"the probe needs x86_64 and {PYTHON}")
    name = f"corral-spec-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A host directory with a tmpfs submount (mounted with suid and dev allowed)."""
    source = tmp_path / "shared"
    (source / "sub").mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,suid,dev", "tmpfs", str(source / "sub")],
        check=True,
        capture_output=True,
    )
    try:
        yield source
    finally:
        subprocess.run(["umount", "-l", str(source / "sub")], check=False, capture_output=True)


def _rootfs(base: Path) -> Path:
    rootfs = base / "rootfs"
    rootfs.mkdir()
    rootfs.chmod(0o755)  # uid 1000 must be able to walk "/"
    for name, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (rootfs / name).symlink_to(target)
    for name in ("usr", "etc", "home/user", "tmp"):
        (rootfs / name).mkdir(parents=True, mode=0o755)
    os.chown(rootfs / "home/user", 1000, 1000)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "probe.py").write_text(PROBE % (MASKED_PATHS,))
    (rootfs / "probe.py").chmod(0o644)
    return rootfs


def _run_probe(tmp_path: Path, netns: Path, shared: Path, uid: int) -> dict[str, object]:
    rootfs = _rootfs(tmp_path)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    state = tmp_path / "state"
    cid = f"corral-spec-test-{secrets.token_hex(4)}"
    config = runtime_config(
        rootfs=rootfs,
        process=ProcessSpec(
            argv=(PYTHON, "-I", "/probe.py"),
            env=(("PATH", "/usr/bin"), ("HOME", "/home/user"), ("LANG", "C.UTF-8")),
            uid=uid,
            gid=uid,
        ),
        hostname="probe-box",
        netns=netns,
        cgroups_path=f"/{cid}",
        limits=LIMITS,
        mounts=(
            BindMount(source=Path("/usr"), destination="/usr"),
            BindMount(source=shared, destination="/data"),
        ),
    )
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    argv = ["runc", "--root", str(state), "run", "--bundle", str(bundle), cid]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    finally:
        subprocess.run(
            ["runc", "--root", str(state), "delete", "--force", cid],
            capture_output=True,
            check=False,
        )
    assert proc.returncode == 0, f"runc exited {proc.returncode}: {proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout)
    # runc removes the cgroup it created when the container is deleted.
    assert not Path(f"/sys/fs/cgroup/memory/{cid}").exists()
    return result


def test_agent_process_is_unprivileged_and_confined(
    tmp_path: Path, netns: Path, shared: Path
) -> None:
    r = _run_probe(tmp_path, netns, shared, uid=1000)

    assert (r["uid"], r["gid"], r["groups"]) == (1000, 1000, [])
    for field in ("cap_eff", "cap_prm", "cap_inh", "cap_amb"):
        assert int(str(r[field]), 16) == 0, field
    assert int(str(r["cap_bnd"]), 16) == sum(1 << bit for bit in _CAP_BITS.values())
    assert r["no_new_privs"] == "1"
    assert r["seccomp"] == "2"
    assert r["hostname"] == "probe-box"
    assert r["netns_inode"] == os.stat(netns).st_ino
    assert r["interfaces"] == ["lo"]
    _assert_masked(r)
    assert r["mem_limit"] == str(LIMITS.memory_bytes)
    assert r["memsw_limit"] == str(LIMITS.memory_bytes)
    assert r["pids_max"] == str(LIMITS.pids)
    assert r["cfs_quota"] == str(LIMITS.cpu_quota_us)
    assert r["nofile"] == [4096, 4096]
    # Ordinary work still works: threads (clone3 -> ENOSYS -> clone), fork+exec, /tmp.
    assert r["thread"] == ["ran"]
    assert r["true_rc"] == 0
    assert r["tmp_write"] == 0
    assert r["usr_write"] != 0
    assert r["mounts_ro"] == {
        "/usr": {"ro": True, "nosuid": True},
        "/": {"ro": False},
        # A submount carried in by rbind gets the flags too (the recursive "r" options).
        "/data/sub": {"ro": True, "nosuid": True, "nodev": True},
    }
    # The setuid mount binary cannot help: nosuid /usr plus no_new_privs.
    assert r["unshare_rc"] != 0
    assert r["mount_rc"] != 0
    _assert_syscalls(r)


def test_root_edit_session_has_bounding_caps_but_same_filter(
    tmp_path: Path, netns: Path, shared: Path
) -> None:
    r = _run_probe(tmp_path, netns, shared, uid=0)

    expected = sum(1 << _CAP_BITS[cap] for cap in BOUNDING_CAPABILITIES)
    assert r["uid"] == 0
    assert int(str(r["cap_eff"]), 16) == expected
    assert int(str(r["cap_prm"]), 16) == expected
    assert int(str(r["cap_bnd"]), 16) == expected
    assert int(str(r["cap_amb"]), 16) == 0
    assert r["no_new_privs"] == "1"
    assert r["seccomp"] == "2"
    assert r["usr_write"] != 0  # read-only even for root
    assert r["unshare_rc"] != 0
    assert r["mount_rc"] != 0
    _assert_syscalls(r)


def _assert_masked(r: dict[str, object]) -> None:
    # Which of these exist depends on the host kernel's config (this VM has no /proc/kcore),
    # so compare with the host: whatever exists must show up empty inside.
    masked = r["masked"]
    assert isinstance(masked, dict)
    assert any(Path(path).exists() for path in MASKED_PATHS), "nothing to check on this host"
    for path in MASKED_PATHS:
        if not Path(path).exists():
            assert masked[path] == "absent", path
        elif Path(path).is_dir():
            assert masked[path] == ["dir", []], path  # an empty read-only tmpfs over it
        else:
            assert masked[path] == ["file", 1, 3, ""], path  # /dev/null bound over it


def _assert_syscalls(r: dict[str, object]) -> None:
    calls = r["sys"]
    assert isinstance(calls, dict)
    # EPERM from the filter, not from the kernel: unshare(0) and PTRACE_TRACEME would
    # otherwise succeed, and chroot/mount with NULL pointers would otherwise fail EFAULT.
    for name in (
        "unshare_0",
        "unshare_newuser",
        "setns",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "ptrace_traceme",
        "keyctl",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "open_by_handle_at",
        "io_uring_setup",
        "clone_newuser",
        "clone_newns",
        "personality_no_aslr",
        "quotactl_fd",
    ):
        assert calls[name] == "EPERM", (name, calls[name])
    assert calls["clone3"] == "ENOSYS"
    assert calls["personality_query"] == "OK"
    # Allowed, so the kernel itself answers (the path pointer is NULL).
    assert calls["fchmodat2"] == "EFAULT"
    # Newer than the newest syscall in the profile: runc's generated BPF stub answers
    # ENOSYS rather than the default EPERM, so libc falls back instead of giving up.
    assert calls["mseal"] == "ENOSYS"
