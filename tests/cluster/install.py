"""The chart's workloads onto the harness's cluster, as the controllers would place
them: the CA Deployment's pod on the first node, one agent DaemonSet pod per node;
readiness as the kubelet probes it (HTTP from the node; the exec probe
``test -e /tmp/ready`` read where the container's /tmp volume lives)."""

from __future__ import annotations

import http.client
import ssl
import uuid
from dataclasses import dataclass
from typing import Any

from lab import nsenter
from tests.cluster.chart import NAMESPACE
from tests.cluster.cluster import Cluster, wait_for
from tests.cluster.runtime import Pod

AGENT_DS, PROXY_DS = "trellis-agent", "trellis-proxy"
CA_DEPLOYMENT = "trellis-ca"


def _name(base: str) -> str:
    return f"{base}-{uuid.uuid4().hex[:5]}"


def _template(cluster: Cluster, kind: str, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    template = cluster.rendered.get(kind, name)["spec"]["template"]
    return template["spec"], template["metadata"].get("labels", {})


def run_ca(cluster: Cluster, node: str = "node-1") -> Pod:
    spec, labels = _template(cluster, "Deployment", CA_DEPLOYMENT)
    pod = cluster.run_pod(node, _name(CA_DEPLOYMENT), NAMESPACE, spec, labels)
    for service in cluster.rendered.of_kind("Service"):
        selector = service["spec"].get("selector", {})
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            meta = service["metadata"]
            base = f"{meta['name']}.{meta['namespace']}"
            # Cluster DNS and kube-proxy in one: the Service's names lead to its pod.
            for host in (base, f"{base}.svc", f"{base}.svc.cluster.local"):
                cluster.runtime.hosts[host] = pod.facts.ip
    return pod


def run_daemonset(cluster: Cluster, name: str, node: str) -> Pod:
    spec, labels = _template(cluster, "DaemonSet", name)
    return cluster.run_pod(node, _name(name), NAMESPACE, spec, labels)


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or port.isdigit():
        return int(port)
    return int(next(p["containerPort"] for p in container.get("ports", [])
                    if p.get("name") == port))


def http_ready(pod: Pod, port: int, path: str, scheme: str = "HTTP") -> bool:
    """As the kubelet probes: from the node, HTTPS without verifying the certificate."""
    sock = nsenter.connect_in(pod.node.netns, pod.facts.ip, port, 2.0)
    if scheme == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        sock = context.wrap_socket(sock)
    conn = http.client.HTTPConnection(pod.facts.ip, port, timeout=2.0)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return 200 <= conn.getresponse().status < 400
    finally:
        conn.close()


def probe(pod: Pod, container: dict[str, Any]) -> bool:
    readiness = container.get("readinessProbe")
    if not readiness:
        return True
    if "httpGet" in readiness:
        get = readiness["httpGet"]
        return http_ready(pod, _port(container, get["port"]), get.get("path", "/"),
                          get.get("scheme", "HTTP"))
    if "tcpSocket" in readiness:
        port = _port(container, readiness["tcpSocket"]["port"])
        with nsenter.connect_in(pod.node.netns, pod.facts.ip, port, 2.0):
            return True
    command = readiness["exec"]["command"]
    assert command[:2] == ["test", "-e"], f"exec probe not understood: {command}"
    return bool(file_in_container(pod, container, command[2]).exists())


def file_in_container(pod: Pod, container: dict[str, Any], path: str) -> Any:
    """The machine's path of ``path`` in ``container``, through its volume mounts."""
    best = max((m for m in container.get("volumeMounts", [])
                if path.startswith(m["mountPath"].rstrip("/") + "/")),
               key=lambda m: len(m["mountPath"]))
    volume = next(v for v in pod.spec["volumes"] if v["name"] == best["name"])
    if "hostPath" in volume:
        base = pod.node.host_path(volume["hostPath"]["path"])
    else:
        base = pod.dir / "volumes" / best["name"]
    if best.get("subPath"):
        base = base / best["subPath"]
    return base / path[len(best["mountPath"].rstrip("/")) + 1:]


def wait_ready(cluster: Cluster, pod: Pod, timeout: float = 90.0) -> None:
    for container in pod.spec["containers"]:
        process = pod.containers.get(container["name"])

        def ready(c: dict[str, Any] = container, p: Any = process) -> bool:
            assert p is None or p.poll() is None, \
                f"{pod.facts.name}/{c['name']} exited {p.poll()}:\n{cluster.logs(pod)}"
            return probe(pod, c)
        wait_for(f"{pod.facts.name}/{container['name']} ready", ready, timeout=timeout,
                 interval=0.5, detail=lambda: cluster.logs(pod))


@dataclass
class Installed:
    ca: Pod
    daemons: dict[tuple[str, str], Pod]  # (DaemonSet, node) → its pod there

    def on(self, daemonset: str, node: str) -> Pod:
        return self.daemons[daemonset, node]


def install(cluster: Cluster) -> Installed:
    """The CA first (the proxies need it), then every DaemonSet's pod on every node,
    all started before any is waited for (as the controllers do); all ready."""
    ca = run_ca(cluster)
    wait_ready(cluster, ca)
    daemons = {(ds["metadata"]["name"], node): run_daemonset(cluster, ds["metadata"]["name"], node)
               for ds in cluster.rendered.of_kind("DaemonSet") for node in cluster.nodes}
    for pod in daemons.values():
        wait_ready(cluster, pod)
    return Installed(ca, daemons)
