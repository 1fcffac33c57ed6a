"""Can eBPF redirection work on this host? Each missing piece is named with its fix.

Checked once, when the agent starts in ``--redirect ebpf`` mode, so a host that
cannot do it fails at start with one line, not at the first pod:

- a kernel of 6.6 or newer (tcx links, which can be pinned, for tc ingress);
- cgroup v2 mounted (the programs are attached per pod cgroup);
- bpffs at /sys/fs/bpf (mounted here when absent, as Cilium and Calico do);
- bcc's Python module (Debian: python3-bpfcc);
- kernel headers where bcc looks, /lib/modules/$(uname -r)/build (``make
  setup`` links the distribution's headers there when none match the kernel).

BTF is not needed: bcc compiles against those headers, and the programs read
only the stable context structs of the BPF ABI.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

MIN_KERNEL = (6, 6)
BPFFS = "/sys/fs/bpf"
_FIX = "or run the agent with --redirect iptables"


class EbpfUnavailable(RuntimeError):
    """eBPF redirection cannot work here; the message says why and what to change."""


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a release string such as 6.18.44-fc or 6.6rc1; (0, 0) if none."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> str:
    for line in Path(mounts).read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return fields[1]
    raise EbpfUnavailable("no cgroup v2 hierarchy is mounted: mount one "
                          f"(mount -t cgroup2 none /sys/fs/cgroup/unified) {_FIX}")


def _bpffs_mounted(mounts: str = "/proc/self/mounts") -> bool:
    return any(len(f) > 2 and f[1] == BPFFS and f[2] == "bpf"
               for f in (line.split() for line in Path(mounts).read_text().splitlines()))


def _ensure_bpffs(root: str) -> None:
    if not root.startswith(BPFFS + "/"):
        raise EbpfUnavailable(f"bpf root {root!r} is not under {BPFFS}")
    if _bpffs_mounted():
        return
    done = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise EbpfUnavailable(f"bpffs is not mounted at {BPFFS} and mounting it failed "
                              f"({done.stderr.strip()}): mount -t bpf bpf {BPFFS} {_FIX}")


def check_support(bpf_root: str) -> None:
    release = os.uname().release
    if kernel_version(release) < MIN_KERNEL:
        raise EbpfUnavailable(f"kernel {release} is older than "
                              f"{'.'.join(map(str, MIN_KERNEL))} (tcx links): upgrade the "
                              f"kernel {_FIX}")
    cgroup2_mount()
    if importlib.util.find_spec("bcc") is None:
        raise EbpfUnavailable("bcc's Python module is not installed: run `make setup` "
                              f"(Debian package python3-bpfcc; the venv needs "
                              f"--system-site-packages) {_FIX}")
    build = Path("/lib/modules") / release / "build"
    if not (build / "include").is_dir() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise EbpfUnavailable(f"no kernel headers for {release} at {build}: run `make setup`, "
                              f"which links the distribution's headers there {_FIX}")
    _ensure_bpffs(bpf_root)
