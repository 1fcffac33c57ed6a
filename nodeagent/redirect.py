"""The contract between the agent and a redirection mode (iptables now, eBPF later)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tunnel.state import Workload


class RedirectError(OSError):
    """Redirection of one pod could not be installed or removed.

    An ``OSError`` because the cause always is one (a tool that failed, a
    namespace that vanished), so callers treat it like any other I/O failure.
    """

    def __init__(self, pod: PodNetwork | str, what: str) -> None:
        key = pod.key if isinstance(pod, PodNetwork) else pod
        where = f" (netns {pod.netns_path})" if isinstance(pod, PodNetwork) else ""
        super().__init__(f"pod {key}{where}: {what}")
        self.pod_key = key


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """Everything a redirector needs to know about one pod."""

    uid: str
    key: str  # "namespace/name", for messages
    netns_path: str  # /run/netns/X or /proc/PID/ns/net
    ip: str
    # The pod's cgroup v2 directory; only the eBPF mode needs it (it attaches there).
    cgroup: str = ""

    @classmethod
    def of(cls, workload: Workload, netns_path: str = "") -> PodNetwork:
        """The pod's network; ``netns_path`` overrides the workload's own (a
        Kubernetes source finds it from the pod's cgroup instead)."""
        path = netns_path or workload.netns
        if not path:
            raise RedirectError(workload.key, "no network namespace path is known "
                                "(metadata.annotations['trellis.dev/netns'])")
        if not workload.ip:
            raise RedirectError(workload.key, "the pod has no IP (status.podIP)")
        return cls(workload.uid, workload.key, path, workload.ip, workload.cgroup)


class Redirector(Protocol):
    """Installs and removes the capture of one pod's traffic to the proxy.

    Both calls are idempotent and block (they run tools and netlink), so the
    agent calls them from a worker thread. ``remove`` of a pod whose namespace is
    already gone succeeds: its rules went with it.
    """

    name: str

    def apply(self, pod: PodNetwork) -> None: ...

    def remove(self, pod: PodNetwork) -> None: ...
