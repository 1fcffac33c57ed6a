"""Helpers for the Kubernetes source tests: objects, a kubeconfig, a snapshot follower."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fake_apiserver import CHART_CRDS, ISTIO_POLICIES, TRELLIS_POLICIES, FakeApiServer
from kubernetes_asyncio import client

from nodeagent.k8s_client import api_client, load_configuration
from nodeagent.objects import Snapshot
from nodeagent.source_k8s import KubernetesSource

PODS = "/api/v1/pods"
NAMESPACES = "/api/v1/namespaces"
SERVICES = "/api/v1/services"
ENDPOINT_SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
# A cluster that has Istio's CRDs as well as the chart's.
WITH_ISTIO = CHART_CRDS | {ISTIO_POLICIES}
__all__ = ["ISTIO_POLICIES", "TRELLIS_POLICIES", "WITH_ISTIO"]  # re-exported for the tests
SNAPSHOT_WAIT_S = 10.0  # a generous bound for "a snapshot arrives"; never a speed claim


def namespace(name: str, ambient: bool = True) -> dict[str, Any]:
    labels = {"trellis.dev/dataplane-mode": "ambient"} if ambient else {}
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "labels": labels, "uid": f"ns-{name}"}}


def pod(name: str, ip: str, *, node: str = "node-1", ns: str = "demo", sa: str = "web",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                         "labels": labels if labels is not None else {"app": "web"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "app", "image": "demo"}]},
            "status": {"podIP": ip, "phase": "Running"}}


def service(name: str, vip: str, selector: dict[str, str], ns: str = "demo") -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(name: str, service_name: str, endpoints: dict[str, bool | None],
                   ns: str = "demo") -> dict[str, Any]:
    """``endpoints``: address → ready condition (None: the condition is absent)."""
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": "node-1",
                           "conditions": {} if ready is None else {"ready": ready}}
                          for ip, ready in endpoints.items()]}


def policy(name: str, group: str, ns: str = "demo", action: str = "DENY") -> dict[str, Any]:
    return {"kind": "AuthorizationPolicy", "apiVersion": f"{group}/v1",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"action": action, "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/demo/sa/legacy"]}}]}]}}


def write_kubeconfig(path: Path, server: FakeApiServer) -> Path:
    path.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: agent, user: {{token: {server.token}}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
""")
    return path


async def api_factory(kubeconfig: Path) -> Callable[[], client.ApiClient]:
    configuration = await load_configuration(kubeconfig)
    return lambda: api_client(configuration)


class Follower:
    """Reads a source's snapshots in the background; tests wait for a condition."""

    def __init__(self, snapshots: AsyncIterator[Snapshot]) -> None:
        self.seen: list[Snapshot] = []
        self._snapshots = snapshots
        self._new = asyncio.Condition()

    async def run(self) -> None:
        async for snapshot in self._snapshots:
            self.seen.append(snapshot)
            async with self._new:
                self._new.notify_all()

    @property
    def last(self) -> Snapshot:
        return self.seen[-1]

    async def until(self, check: Callable[[Snapshot], bool],
                    timeout: float = SNAPSHOT_WAIT_S) -> Snapshot:
        async with asyncio.timeout(timeout):
            async with self._new:
                await self._new.wait_for(lambda: bool(self.seen) and check(self.seen[-1]))
        return self.seen[-1]


def source(factory: Callable[[], client.ApiClient], **options: Any) -> KubernetesSource:
    options.setdefault("debounce_s", 0.05)
    options.setdefault("backoff_initial_s", 0.05)
    options.setdefault("backoff_max_s", 0.5)
    return KubernetesSource(factory, node="node-1", **options)


def watched(src: KubernetesSource) -> int:
    """How many watches the source keeps open: one per resource the server serves."""
    return sum(not r.absent for r in src.reflectors)


def names(snapshot: Snapshot) -> set[str]:
    return {w.name for w in snapshot.state.workloads}


def enrolled(snapshot: Snapshot, node: str = "node-1") -> set[str]:
    return {w.name for w in snapshot.state.workloads if w.enrolled and w.node == node}
