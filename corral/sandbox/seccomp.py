"""The seccomp filter every sandbox runs under: the OCI ``linux.seccomp`` object.

This module owns the syscall allowlist and nothing else. It is pure data: it never talks
to the kernel, never loads a filter itself and never reads the environment (the host's
machine type is the one input, and the caller may pass it). ``corral.sandbox.spec`` is its
only consumer; runc turns the object into BPF via libseccomp.

The profile is an allowlist, at least as strict as Docker's default profile:

* anything not named below fails with EPERM (``defaultErrnoRet`` 1), so code that probes
  an optional feature sees an ordinary "not permitted" instead of being killed;
* the escape-and-tamper syscalls (mount, namespaces, ptrace, module loading, BPF, keyrings,
  clock setting, ...) are listed in ``FORBIDDEN`` and must never appear in an allow rule;
  the unit tests hold us to that;
* ``clone`` is allowed only without namespace flags, ``clone3`` answers ENOSYS (its flags
  live in a struct in user memory that seccomp cannot inspect, and ENOSYS makes glibc fall
  back to ``clone``), and ``personality`` only with harmless values.

Names that the host's libseccomp does not know are skipped by runc 1.1 (it logs
"unknown seccomp syscall ... ignored" at debug level) rather than failing, so listing a
syscall newer than libseccomp is harmless. runc also answers ENOSYS, not EPERM, for
syscall numbers above the newest one named here that libseccomp resolved, which is what
glibc wants for brand-new syscalls it probes by trying them.
"""

from __future__ import annotations

import platform
from typing import Final

EPERM: Final = 1
ENOSYS: Final = 38

# Namespace-creating clone flags (include/uapi/linux/sched.h). A process holding them could
# build a fresh mount or user namespace and start chipping at the sandbox from inside it.
CLONE_NEWNS: Final = 0x0002_0000
CLONE_NEWCGROUP: Final = 0x0200_0000
CLONE_NEWUTS: Final = 0x0400_0000
CLONE_NEWIPC: Final = 0x0800_0000
CLONE_NEWUSER: Final = 0x1000_0000
CLONE_NEWPID: Final = 0x2000_0000
CLONE_NEWNET: Final = 0x4000_0000
CLONE_NAMESPACE_FLAGS: Final = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# personality(2) values that change nothing security-relevant: PER_LINUX, PER_LINUX32,
# UNAME26, PER_LINUX32|UNAME26, and 0xffffffff which only queries the current persona.
# Everything else (notably ADDR_NO_RANDOMIZE and READ_IMPLIES_EXEC) stays denied.
SAFE_PERSONALITIES: Final = (0x0000_0000, 0x0000_0008, 0x0002_0000, 0x0002_0008, 0xFFFF_FFFF)

# The syscall tables below are hand-grouped, a few names per line; keep the formatter off them.
# fmt: off
# Never allowed, under any argument. Kept as data so tests (and reviewers) can check it.
FORBIDDEN: Final = frozenset(
    {
        # mounting and changing root
        "mount", "umount", "umount2", "pivot_root", "chroot", "mount_setattr",
        "fsopen", "fsmount", "fsconfig", "fspick", "move_mount", "open_tree",
        # entering or creating namespaces
        "unshare", "setns",
        # reaching into other processes
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
        # kernel code and kernel-wide state
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "create_module", "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie",
        "syslog", "acct", "swapon", "swapoff", "reboot", "quotactl", "quotactl_fd",
        "nfsservctl", "uselib", "vhangup", "iopl", "ioperm",
        # keyrings are not namespaced
        "keyctl", "add_key", "request_key",
        # file handles bypass path-based confinement (the "shocker" escape)
        "open_by_handle_at", "name_to_handle_at",
        # clocks are not namespaced
        "settimeofday", "stime", "clock_settime", "clock_settime64", "adjtimex",
        "clock_adjtime", "clock_adjtime64",
        # io_uring runs syscalls from kernel workers, out of this filter's sight
        "io_uring_setup", "io_uring_enter", "io_uring_register",
    }
)

# --- the allowlist, grouped; each group is unconditionally allowed ----------------------

# Reading, writing and positioning on file descriptors.
_FD_IO = (
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "lseek", "sendfile", "splice", "tee", "vmsplice",
    "copy_file_range", "fadvise64", "readahead", "fallocate", "ftruncate", "fsync",
    "fdatasync", "sync", "syncfs", "sync_file_range",
)
# Opening, closing and duplicating descriptors, and per-descriptor control.
_FD_LIFECYCLE = (
    "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2", "dup3",
    "fcntl", "flock", "ioctl", "pipe", "pipe2", "memfd_create",
)
# Path lookups and metadata (stat family, directories, links, permissions, times).
_PATHS = (
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs", "access",
    "faccessat", "faccessat2", "readlink", "readlinkat", "getdents", "getdents64",
    "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "rename", "renameat",
    "renameat2", "unlink", "unlinkat", "link", "linkat", "symlink", "symlinkat",
    "mknod", "mknodat", "truncate", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown",
    "fchown", "lchown", "fchownat", "umask", "utime", "utimes", "futimesat", "utimensat",
)
# Extended attributes (pip and tar preserve them; security.* ones still need caps).
_XATTRS = (
    "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
)
# Waiting for readiness and events: poll/select/epoll, eventfd, inotify, timers as fds.
_EVENTS = (
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "inotify_init",
    "inotify_init1", "inotify_add_watch", "inotify_rm_watch", "timerfd_create",
    "timerfd_settime", "timerfd_gettime", "signalfd", "signalfd4",
)
# Asynchronous I/O of the classic kind (libaio); io_uring is deliberately absent.
_AIO = ("io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents")
# Address-space management for the allocator, the dynamic loader and mmap'd files.
_MEMORY = (
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "mlock",
    "mlock2", "munlock", "mlockall", "munlockall", "remap_file_pages", "membarrier",
    "pkey_alloc", "pkey_free", "pkey_mprotect",
)
# Threads and synchronisation: futexes, robust lists, TLS set-up, restartable sequences.
_THREADS = (
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "set_tid_address",
    "rseq", "arch_prctl", "sched_yield", "restart_syscall",
)
# Process life cycle (clone and personality are added below with argument filters).
_PROCESSES = (
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
    "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal", "getpid", "getppid",
    "gettid", "getpgid", "setpgid", "getpgrp", "getsid", "setsid", "prctl", "seccomp",
)
# Identity: reading it always works; changing it only succeeds with caps we do not grant.
_CREDENTIALS = (
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid", "capget", "capset",
)
# Scheduling, priorities and resource limits of our own processes.
_SCHEDULING = (
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_setparam",
    "sched_getscheduler", "sched_setscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval", "sched_getattr", "sched_setattr",
    "getpriority", "setpriority", "ioprio_get", "ioprio_set", "getrlimit", "setrlimit",
    "prlimit64", "getrusage", "times", "getcpu",
)
# Signals.
_SIGNALS = (
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend", "rt_sigpending",
    "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "pause",
    "alarm",
)
# Reading clocks, sleeping and interval timers (setting clocks is FORBIDDEN).
_TIME = (
    "clock_gettime", "clock_getres", "clock_nanosleep", "gettimeofday", "time",
    "nanosleep", "getitimer", "setitimer", "timer_create", "timer_settime",
    "timer_gettime", "timer_getoverrun", "timer_delete",
)
# Sockets of every family. socket(2) is not filtered by family: raw and packet sockets
# already need CAP_NET_RAW, which is outside the bounding set, and the sandbox sits in its
# own network namespace. AF_NETLINK in particular stays allowed because glibc's
# getaddrinfo(AI_ADDRCONFIG) and Python's socket.if_nameindex() open NETLINK_ROUTE to list
# interfaces; without CAP_NET_ADMIN a netlink socket can only read that namespace's state.
_SOCKETS = (
    "socket", "socketpair", "bind", "connect", "listen", "accept", "accept4",
    "getsockname", "getpeername", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
    "recvmmsg", "shutdown", "setsockopt", "getsockopt",
)
# System V and POSIX IPC; the IPC namespace is private, so these only reach the sandbox.
_IPC = (
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
)
# System information (uname is per-UTS-namespace; getrandom feeds os.urandom and ssl).
_SYSTEM_INFO = ("uname", "sysinfo", "getrandom")

# 32-bit x86 and x32 only: legacy multiplexers, 64-bit-offset and 32-bit-uid variants,
# and the *_time64 calls that y2038-safe 32-bit glibc uses.
_X86_32 = (
    "socketcall", "ipc", "_llseek", "_newselect", "waitpid", "mmap2", "stat64", "fstat64",
    "lstat64", "fstatat64", "statfs64", "fstatfs64", "truncate64", "ftruncate64",
    "fcntl64", "sendfile64", "fadvise64_64", "set_thread_area", "get_thread_area",
    "sigaction", "sigprocmask", "sigreturn", "sigsuspend", "sigpending", "signal",
    "ugetrlimit", "chown32", "fchown32", "lchown32", "getuid32", "geteuid32", "getgid32",
    "getegid32", "getresuid32", "getresgid32", "getgroups32", "setuid32", "setgid32",
    "setreuid32", "setregid32", "setresuid32", "setresgid32", "setgroups32",
    "setfsuid32", "setfsgid32", "clock_gettime64", "clock_getres_time64",
    "clock_nanosleep_time64", "timer_settime64", "timer_gettime64", "timerfd_settime64",
    "timerfd_gettime64", "futex_time64", "ppoll_time64", "pselect6_time64",
    "recvmmsg_time64", "rt_sigtimedwait_time64", "sched_rr_get_interval_time64",
    "semtimedop_time64", "mq_timedsend_time64", "mq_timedreceive_time64",
    "io_pgetevents_time64", "utimensat_time64",
)
# 32-bit ARM only: its own names for fadvise/sync_file_range, cache flushing and TLS.
_ARM_32 = (
    "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "cacheflush",
    "set_tls", "breakpoint", "send", "recv",
)

_ALWAYS: Final = (
    _FD_IO + _FD_LIFECYCLE + _PATHS + _XATTRS + _EVENTS + _AIO + _MEMORY + _THREADS
    + _PROCESSES + _CREDENTIALS + _SCHEDULING + _SIGNALS + _TIME + _SOCKETS + _IPC
    + _SYSTEM_INFO
)
# fmt: on

# Filter architectures per host machine. The first is native; the others are the compat
# ABIs the kernel would otherwise let a process switch to in order to dodge the filter.
_ARCHITECTURES: Final = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}
_MACHINE_ALIASES: Final = {"amd64": "x86_64", "arm64": "aarch64"}


def profile(machine: str | None = None) -> dict[str, object]:
    """The OCI ``linux.seccomp`` object for a sandbox on ``machine`` (default: this host).

    A fresh dict each call, safe for the caller to embed in a spec and serialise.
    """
    arch = _MACHINE_ALIASES.get(machine or platform.machine(), machine or platform.machine())
    if arch not in _ARCHITECTURES:
        # Corral's sandboxes are only built and tested on these two; refusing here beats
        # shipping a filter whose syscall names were never checked for the platform.
        raise ValueError(f"no seccomp profile for machine {arch!r}")
    architectures = _ARCHITECTURES[arch]
    allowed = _ALWAYS + (_X86_32 if arch == "x86_64" else _ARM_32)
    # A mistake here would silently open a hole, so check the invariant at build time too.
    leaked = FORBIDDEN.intersection(allowed)
    if leaked:
        raise AssertionError(f"seccomp allowlist contains forbidden syscalls: {sorted(leaked)}")

    syscalls: list[dict[str, object]] = [
        {"names": sorted(set(allowed)), "action": "SCMP_ACT_ALLOW"},
        # clone(flags, ...): on x86_64, x86, arm and aarch64 the flags are argument 0 (only
        # the order of the later stack/tid/tls arguments differs between them; s390 is the
        # odd one out and is not supported). With SCMP_CMP_MASKED_EQ, OCI's ``value`` is
        # the mask and ``valueTwo`` the datum: (flags & NAMESPACE_FLAGS) == 0.
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": 0,
                    "value": CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                }
            ],
        },
        # clone3 passes its flags in memory, out of seccomp's reach; ENOSYS makes glibc
        # (2.34+ tries clone3 first for threads) fall back to the filtered clone above.
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    # One rule per value: conditions inside a single rule are ANDed by the OCI spec, and
    # runc's special case that ORs same-index conditions is not something to lean on.
    for value in SAFE_PERSONALITIES:
        syscalls.append(
            {
                "names": ["personality"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": value, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
            }
        )
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(architectures),
        "syscalls": syscalls,
    }
