"""The lab's redirection mode (iptables or ebpf), and what eBPF mode adds to the lab.

The mode is chosen at ``lab up --redirect MODE`` and kept in ``redirect`` in the
lab's directory, so a later ``lab up`` (say, after an agent crashed) starts the
agents the same way. In eBPF mode:

- each pod has its own cgroup v2 directory, ``<cgroup2>/trellis-lab/<lab>/<pod
  netns>``; the pod's app, and every ``lab exec`` command, run inside it, and
  the workloads file names it (annotation ``trellis.dev/cgroup``) because the
  agent attaches the pod's programs there;
- each node's agent pins under ``/sys/fs/bpf/trellis/<lab>/<node>``, so ``lab
  down`` can unpin exactly this lab's objects (which detaches them) and nothing
  of another lab's.

In iptables mode none of this exists and the lab is exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from lab.errors import LabError
from lab.plan import LabPlan, PodPlan
from lab.state import LabDir

MODES = ("iptables", "ebpf")
CGROUP_PARENT = "trellis-lab"
BPF_PARENT = "/sys/fs/bpf/trellis"
CGROUP_ANNOTATION = "trellis.dev/cgroup"


def mode_file(labdir: LabDir) -> Path:
    return labdir.root / "redirect"


def read_mode(labdir: LabDir) -> str:
    try:
        mode = mode_file(labdir).read_text().strip()
    except FileNotFoundError:
        return "iptables"
    return mode if mode in MODES else "iptables"


def choose_mode(labdir: LabDir, requested: str | None, lab_is_up: bool) -> str:
    """The mode for this ``lab up``: the one asked for, else the lab's own."""
    current = read_mode(labdir)
    if requested is None:
        return current
    if lab_is_up and requested != current:
        raise LabError(f"the lab is up in {current} mode; run `trellis lab down` before "
                       f"`trellis lab up --redirect {requested}`")
    labdir.root.mkdir(parents=True, exist_ok=True)
    mode_file(labdir).write_text(requested + "\n")
    return requested


def _lab_name(prefix: str) -> str:
    return prefix.rstrip("-") or "tlab"


def _cgroup2_mount() -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return fields[1]
    raise LabError("eBPF mode needs a cgroup v2 hierarchy, and none is mounted "
                   "(mount -t cgroup2 none /sys/fs/cgroup/unified)")


def lab_cgroups(prefix: str) -> Path:
    return Path(_cgroup2_mount()) / CGROUP_PARENT / _lab_name(prefix)


def pod_cgroup(plan: LabPlan, pod: PodPlan) -> str:
    return str(lab_cgroups(plan.prefix) / pod.netns)


def bpf_root(prefix: str, node: str) -> str:
    return f"{BPF_PARENT}/{_lab_name(prefix)}/{node}"


def agent_arguments(labdir: LabDir, plan: LabPlan, node: str) -> tuple[str, ...]:
    if read_mode(labdir) != "ebpf":
        return ()
    return ("--redirect", "ebpf", "--bpf-root", bpf_root(plan.prefix, node))


def cgroups_for(labdir: LabDir, plan: LabPlan) -> dict[str, str]:
    """Pod key → its cgroup directory, in eBPF mode only (else empty)."""
    if read_mode(labdir) != "ebpf":
        return {}
    return {pod.key: pod_cgroup(plan, pod) for pod in plan.pods}


def in_cgroup(cgroup: str, argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` run from inside ``cgroup`` (made if missing): the shell joins, then execs."""
    if not cgroup:
        return tuple(argv)
    os.makedirs(cgroup, exist_ok=True)
    return ("sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv)


def remove(labdir: LabDir, prefix: str) -> int:
    """Unpin this lab's eBPF objects (detaching them), remove its pod cgroups and
    the mode file. Called by ``lab down`` after every process of the lab stopped."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        mode_file(labdir).unlink()
    pins = Path(BPF_PARENT) / _lab_name(prefix)
    if pins.exists():
        shutil.rmtree(pins, ignore_errors=True)  # unlinking a pin drops its link
        removed += 1
    with contextlib.suppress(LabError):
        parent = lab_cgroups(prefix)
        if parent.is_dir():
            for cgroup in sorted(p for p in parent.iterdir() if p.is_dir()):
                with contextlib.suppress(OSError):  # a straggler still inside: left
                    cgroup.rmdir()
                    removed += 1
            with contextlib.suppress(OSError):
                parent.rmdir()
                parent.parent.rmdir()  # trellis-lab/, once no lab has cgroups there
    with contextlib.suppress(OSError):
        Path(BPF_PARENT).rmdir()  # likewise: only when empty
    return removed
