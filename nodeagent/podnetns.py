"""Find a running pod's network namespace from its cgroup (Kubernetes mode).

The API server knows a pod's UID but not its namespace path; the container
runtime puts every process of a pod in a cgroup whose path names that UID, so the
agent (running with ``hostPID``) scans ``/proc/<pid>/cgroup`` and takes
``/proc/<pid>/ns/net`` of a matching process. Both kubelet cgroup drivers:

- cgroupfs: ``/kubepods/besteffort/pod<uid>/<container id>``
- systemd:  ``/kubepods.slice/.../kubepods-besteffort-pod<uid with _ for ->.slice/...``

The host's namespace is never taken: a ``hostNetwork`` pod's processes sit in the
host namespace, and enrolling "them" would redirect the whole node. Any candidate
whose namespace inode equals the agent's own (the agent runs with
``hostNetwork``) or init's is skipped. Of the remaining processes the lowest PID is
taken: the sandbox ("pause") process starts first and lives as long as the pod.

``scan`` is pure over a directory tree, so unit tests give it a fake ``/proc``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tunnel.state import Workload

log = logging.getLogger("trellis.nodeagent.podnetns")

_POD_IN_CGROUP = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                            r"[-_][0-9a-f]{12})")


def pod_uids_in_cgroup(text: str) -> set[str]:
    """Pod UIDs (dashed form) named by the contents of a ``/proc/<pid>/cgroup`` file."""
    return {m.group(1).replace("_", "-") for m in _POD_IN_CGROUP.finditer(text)}


def _netns_inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:  # the process exited mid-scan, or we may not look
        return None


def scan(proc: Path, uids: Iterable[str], host_inodes: frozenset[int]) -> dict[str, str]:
    """``{pod uid: "<proc>/<pid>/ns/net"}`` for every wanted UID found running."""
    wanted = set(uids)
    found: dict[str, tuple[int, str]] = {}
    if not wanted:
        return {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "cgroup").read_text()
        except OSError:
            continue
        for uid in pod_uids_in_cgroup(text) & wanted:
            pid = int(entry.name)
            if uid in found and found[uid][0] < pid:
                continue
            netns = Path(entry.path, "ns", "net")
            inode = _netns_inode(netns)
            if inode is None or inode in host_inodes:
                continue
            found[uid] = (pid, str(netns))
    return {uid: path for uid, (_pid, path) in found.items()}


def host_netns_inodes(proc: Path = Path("/proc")) -> frozenset[int]:
    """The namespaces that are the host's: the agent's own and PID 1's."""
    inodes = {_netns_inode(proc / "self" / "ns" / "net"), _netns_inode(proc / "1" / "ns" / "net")}
    return frozenset(i for i in inodes if i is not None)


@dataclass(frozen=True)
class ProcNetnsResolver:
    """The Reconciler's netns hook on Kubernetes: one ``/proc`` scan for all pods asked."""

    proc: Path = Path("/proc")

    def __call__(self, workloads: Iterable[Workload]) -> Mapping[str, str]:
        uids = [w.uid for w in workloads]
        return scan(self.proc, uids, host_netns_inodes(self.proc))
