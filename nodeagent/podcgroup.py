"""Find a pod's cgroup v2 directory when the source does not name it (Kubernetes).

eBPF mode attaches a pod's programs to the pod's cgroup. The lab names it in the
annotation ``trellis.dev/cgroup``; on Kubernetes the kubelet makes one cgroup
per pod whose name carries the pod's UID, with the containers beneath it:

- cgroupfs: ``/kubepods/besteffort/pod<uid>/<container id>``
- systemd:  ``/kubepods.slice/.../kubepods-besteffort-pod<uid with _ for ->.slice/...``

so the agent (``hostPID``) reads ``/proc/<pid>/cgroup`` and keeps the path up to
the component that names the UID: programs attached there apply to every
container of the pod. ``pod_level`` is pure; ``find`` scans a ``/proc`` tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def pod_level(cgroup_path: str, uid: str) -> str | None:
    """The prefix of ``cgroup_path`` ending at the component naming pod ``uid``."""
    forms = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    parts = cgroup_path.strip("/").split("/")
    for depth, part in enumerate(parts, start=1):
        if any(form in part for form in forms):
            return "/" + "/".join(parts[:depth])
    return None


def find(uid: str, mount: str, proc: str = "/proc") -> str:
    """``<mount>/<pod-level cgroup>`` of pod ``uid``, or "" if no process of it runs."""
    with os.scandir(proc) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "cgroup").read_text()
            except OSError:  # the process exited while we looked
                continue
            for line in text.splitlines():
                if line.startswith("0::") and (found := pod_level(line[3:], uid)):
                    return os.path.join(mount, found.lstrip("/"))
    return ""
