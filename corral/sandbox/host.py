"""What a host must have to run sandboxes, checked once and named when missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from corral.errors import RequirementMissing

APT_HINT = "install it with `apt-get install {pkg}` (`make demo` installs everything)"


def check() -> None:
    """Raise RequirementMissing naming the first thing this host lacks."""
    if os.geteuid() != 0:
        raise RequirementMissing(
            "root", "sandboxes mount overlays, create network namespaces and drive runc"
        )
    for binary, pkg in (("runc", "runc"), ("nft", "nftables"), ("ip", "iproute2"), ("tar", "tar")):
        if shutil.which(binary) is None:
            raise RequirementMissing(binary, APT_HINT.format(pkg=pkg))
    if "overlay" not in Path("/proc/filesystems").read_text():
        raise RequirementMissing("overlayfs", "load the module with `modprobe overlay`")
    v1 = Path("/sys/fs/cgroup/memory").is_dir() and Path("/sys/fs/cgroup/pids").is_dir()
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    if not (v1 or v2):
        raise RequirementMissing(
            "cgroups",
            "mount cgroup v1 memory and pids controllers, or cgroup v2, on /sys/fs/cgroup",
        )
