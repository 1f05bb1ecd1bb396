"""runtime_config() and the seccomp profile, checked as data (no runc, no root)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corral.config import SandboxLimits
from corral.errors import InvalidInput
from corral.sandbox import seccomp
from corral.sandbox.spec import (
    BOUNDING_CAPABILITIES,
    FORBIDDEN_CAPABILITIES,
    BindMount,
    ProcessSpec,
    runtime_config,
)

LIMITS = SandboxLimits(memory_bytes=256 * 1024 * 1024, pids=100, cpu_quota_us=50_000)
NETNS = Path("/run/netns/corral-abc")

# The syscalls the brief forbids outright; every one must be absent from every allow rule.
MUST_DENY = {
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "adjtimex",
    "clock_adjtime",
    "iopl",
    "ioperm",
    "quotactl",
    "lookup_dcookie",
    "syslog",
    "vhangup",
    "fsopen",
    "fsmount",
    "fsconfig",
    "move_mount",
    "open_tree",
    "fspick",
    "mount_setattr",
    "create_module",
    "nfsservctl",
    "uselib",
    "pidfd_getfd",
}

# What a Python/glibc/pip workload cannot live without.
MUST_ALLOW = {
    "read",
    "write",
    "openat",
    "close",
    "newfstatat",
    "statx",
    "lseek",
    "mmap",
    "munmap",
    "mprotect",
    "brk",
    "futex",
    "epoll_wait",
    "epoll_ctl",
    "socket",
    "connect",
    "rt_sigaction",
    "rt_sigprocmask",
    "execve",
    "wait4",
    "getrandom",
    "rseq",
    "set_robust_list",
    "exit_group",
    "pipe2",
    "dup3",
    "getdents64",
    "fork",
    "vfork",
}


def config(uid: int = 1000, mounts: tuple[BindMount, ...] = ()) -> dict[str, Any]:
    return runtime_config(
        rootfs=Path("/var/lib/corral/sandboxes/abc/rootfs"),
        process=ProcessSpec(
            argv=("python3", "-c", "print(1)"),
            env=(("PATH", "/usr/bin:/bin"), ("GREETING", "a=b c")),
            uid=uid,
            gid=uid,
        ),
        hostname="corral-abc",
        netns=NETNS,
        cgroups_path="/corral/abc",
        limits=LIMITS,
        mounts=mounts,
    )


def linux(cfg: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = cfg["linux"]
    return section


def seccomp_rules(machine: str = "x86_64") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = seccomp.profile(machine)["syscalls"]  # type: ignore[assignment]
    return found


def allow_rules(machine: str = "x86_64") -> list[dict[str, Any]]:
    return [r for r in seccomp_rules(machine) if r["action"] == "SCMP_ACT_ALLOW"]


# --- capabilities and identity ------------------------------------------------------------


@pytest.mark.parametrize("uid", [1000, 0])
def test_forbidden_capabilities_are_in_no_set(uid: int) -> None:
    caps = config(uid)["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted", "inheritable", "ambient"}
    for name, held in caps.items():
        assert not FORBIDDEN_CAPABILITIES & set(held), name
    assert {
        "CAP_SYS_ADMIN",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_MODULE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_CHROOT",
        "CAP_MKNOD",
    } <= FORBIDDEN_CAPABILITIES


def test_agent_uid_has_no_usable_capabilities() -> None:
    process = config(1000)["process"]
    caps = process["capabilities"]
    assert caps["bounding"] == list(BOUNDING_CAPABILITIES)
    for name in ("effective", "permitted", "inheritable", "ambient"):
        assert caps[name] == [], name
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": []}
    assert process["noNewPrivileges"] is True


def test_root_edit_session_uses_exactly_the_bounding_set() -> None:
    caps = config(0)["process"]["capabilities"]
    assert caps["effective"] == caps["permitted"] == caps["bounding"]
    assert caps["inheritable"] == caps["ambient"] == []
    assert config(0)["process"]["noNewPrivileges"] is True


def test_process_fields() -> None:
    process = config()["process"]
    assert process["args"] == ["python3", "-c", "print(1)"]
    assert process["env"] == ["PATH=/usr/bin:/bin", "GREETING=a=b c"]
    assert process["cwd"] == "/home/user"
    assert process["terminal"] is False
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}]
    assert process["oomScoreAdj"] == 500


# --- namespaces, root, mounts -------------------------------------------------------------


def test_namespaces_have_no_user_ns_and_join_the_given_netns() -> None:
    namespaces = linux(config())["namespaces"]
    types = [ns["type"] for ns in namespaces]
    assert "user" not in types
    assert sorted(types) == ["cgroup", "ipc", "mount", "network", "pid", "uts"]
    network = next(ns for ns in namespaces if ns["type"] == "network")
    assert network == {"type": "network", "path": str(NETNS)}
    assert all("path" not in ns for ns in namespaces if ns["type"] != "network")


def test_root_hostname_and_cgroups_path() -> None:
    cfg = config()
    assert cfg["ociVersion"] == "1.0.2"
    assert cfg["root"] == {"path": "/var/lib/corral/sandboxes/abc/rootfs", "readonly": False}
    assert cfg["hostname"] == "corral-abc"
    assert linux(cfg)["cgroupsPath"] == "/corral/abc"


def test_system_mounts_come_first_in_order() -> None:
    mounts = config()["mounts"]
    assert [(m["destination"], m["type"]) for m in mounts] == [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
        ("/sys/fs/cgroup", "cgroup"),
    ]
    by_dest = {m["destination"]: m["options"] for m in mounts}
    assert "ro" in by_dest["/sys"] and "ro" in by_dest["/sys/fs/cgroup"]
    assert "newinstance" in by_dest["/dev/pts"]
    assert {"nosuid", "noexec", "nodev"} <= set(by_dest["/dev/shm"])


def test_bind_mounts_follow_with_safe_options() -> None:
    mounts = config(
        mounts=(
            BindMount(Path("/srv/layers/usr"), "/usr"),
            BindMount(Path("/srv/work"), "/home/user/work", readonly=False),
        )
    )["mounts"]
    ro, rw = mounts[-2:]
    assert ro["destination"] == "/usr" and ro["source"] == "/srv/layers/usr"
    assert ro["type"] == "bind"
    assert {"rbind", "ro", "rro", "nosuid", "nodev", "rnosuid", "rnodev"} == set(ro["options"])
    assert rw["destination"] == "/home/user/work"
    assert "ro" not in rw["options"] and "rro" not in rw["options"]
    assert {"rbind", "nosuid", "nodev"} <= set(rw["options"])


@pytest.mark.parametrize(
    "destination", ["/", "/proc", "/proc/sys", "/sys/fs", "/dev", "/dev/shm", "usr", "/a/../proc"]
)
def test_bind_mount_refuses_reserved_or_odd_destinations(destination: str) -> None:
    with pytest.raises(InvalidInput):
        BindMount(Path("/srv/x"), destination)


def test_bind_mount_refuses_relative_source() -> None:
    with pytest.raises(InvalidInput):
        BindMount(Path("srv/x"), "/x")


def test_masked_and_readonly_paths() -> None:
    section = linux(config())
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"} <= set(
        section["maskedPaths"]
    )
    assert {"/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/fs", "/proc/irq"} == set(
        section["readonlyPaths"]
    )


# --- resources ----------------------------------------------------------------------------


def test_resources_follow_limits_without_extra_swap() -> None:
    resources = linux(config())["resources"]
    assert resources["memory"] == {"limit": LIMITS.memory_bytes, "swap": LIMITS.memory_bytes}
    assert resources["pids"] == {"limit": 100}
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}


def test_devices_deny_all_then_allow_standard_char_devices() -> None:
    devices = linux(config())["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"}
    allowed = {(d["type"], d["major"], d.get("minor")) for d in devices[1:]}
    assert all(d["allow"] for d in devices[1:])
    assert allowed == {
        ("c", 1, 3),
        ("c", 1, 5),
        ("c", 1, 7),
        ("c", 1, 8),
        ("c", 1, 9),
        ("c", 5, 0),
        ("c", 5, 2),
        ("c", 136, None),
    }


def test_non_positive_limit_is_refused() -> None:
    with pytest.raises(InvalidInput, match="pids"):
        runtime_config(
            rootfs=Path("/r"),
            process=ProcessSpec(argv=("true",), env=()),
            hostname="h",
            netns=NETNS,
            cgroups_path="/c",
            limits=SandboxLimits(pids=0),
        )


# --- input validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"argv": ()},
        {"argv": ("",)},
        {"argv": ("a\0b",)},
        {"env": (("A=B", "x"),)},
        {"env": (("", "x"),)},
        {"env": (("A", "x\0"),)},
        {"env": (("A", "1"), ("A", "2"))},
        {"cwd": "home/user"},
        {"cwd": "/home/../etc"},
        {"uid": -1},
    ],
)
def test_process_spec_rejects_malformed_input(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"argv": ("true",), "env": ()}
    fields.update(kwargs)
    with pytest.raises(InvalidInput):
        ProcessSpec(**fields)


@pytest.mark.parametrize(
    "override",
    [
        {"rootfs": Path("rootfs")},
        {"netns": Path("netns")},
        {"cgroups_path": "corral/abc"},
        {"cgroups_path": "/corral/../abc"},
        {"hostname": "bad_name"},
        {"hostname": "-x"},
        {"hostname": "x" * 64},
    ],
)
def test_runtime_config_rejects_malformed_arguments(override: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {
        "rootfs": Path("/r"),
        "process": ProcessSpec(argv=("true",), env=()),
        "hostname": "h",
        "netns": NETNS,
        "cgroups_path": "/c",
        "limits": LIMITS,
    }
    kwargs.update(override)
    with pytest.raises(InvalidInput):
        runtime_config(**kwargs)


def test_config_is_json_and_fresh_each_call() -> None:
    first, second = config(), config()
    assert json.loads(json.dumps(first)) == first
    linux(first)["seccomp"]["syscalls"].clear()
    assert linux(second)["seccomp"]["syscalls"]


# --- seccomp ------------------------------------------------------------------------------


def test_spec_embeds_the_seccomp_profile() -> None:
    assert linux(config())["seccomp"] == seccomp.profile()


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_default_is_eperm(machine: str) -> None:
    profile = seccomp.profile(machine)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1


def test_seccomp_architectures() -> None:
    assert seccomp.profile("x86_64")["architectures"] == [
        "SCMP_ARCH_X86_64",
        "SCMP_ARCH_X86",
        "SCMP_ARCH_X32",
    ]
    assert seccomp.profile("arm64")["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    with pytest.raises(ValueError, match="s390x"):
        seccomp.profile("s390x")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_never_allows_escape_syscalls(machine: str) -> None:
    allowed = {name for rule in allow_rules(machine) for name in rule["names"]}
    assert not MUST_DENY & allowed
    assert not seccomp.FORBIDDEN & allowed
    assert seccomp.FORBIDDEN >= MUST_DENY
    # Nothing forbidden is even mentioned: no rule of any kind may name one.
    mentioned = {name for rule in seccomp_rules(machine) for name in rule["names"]}
    assert not seccomp.FORBIDDEN & mentioned


def test_seccomp_allows_what_python_needs() -> None:
    allowed = {name for rule in allow_rules() for name in rule["names"]}
    assert allowed >= MUST_ALLOW


def test_unconditional_allow_rules_leave_out_filtered_syscalls() -> None:
    for rule in allow_rules():
        if "args" not in rule:
            assert not {"clone", "clone3", "personality"} & set(rule["names"])


def test_clone_is_allowed_only_without_namespace_flags() -> None:
    rules = [r for r in seccomp_rules() if "clone" in r["names"]]
    assert len(rules) == 1
    (rule,) = rules
    assert rule["names"] == ["clone"]
    assert rule["action"] == "SCMP_ACT_ALLOW"
    mask = 0x7E02_0000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
    assert rule["args"] == [{"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]


def test_clone3_answers_enosys() -> None:
    rules = [r for r in seccomp_rules() if "clone3" in r["names"]]
    assert rules == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]


def test_personality_only_with_safe_values() -> None:
    rules = [r for r in seccomp_rules() if "personality" in r["names"]]
    values = set()
    for rule in rules:
        assert rule["names"] == ["personality"] and rule["action"] == "SCMP_ACT_ALLOW"
        (arg,) = rule["args"]
        assert arg["index"] == 0 and arg["op"] == "SCMP_CMP_EQ"
        values.add(arg["value"])
    assert values == {0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF}


def test_arch_specific_groups() -> None:
    x86 = {n for r in allow_rules() for n in r["names"]}
    arm = {n for r in allow_rules("aarch64") for n in r["names"]}
    assert {"socketcall", "mmap2", "set_thread_area"} <= x86
    assert not {"socketcall", "set_thread_area"} & arm
    assert {"set_tls", "cacheflush"} <= arm
