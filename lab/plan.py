"""The address plan: which namespace, interface and address each part of the lab gets.

A pure function of the lab description (and of the previous plan, so ``apply``
never moves a pod that did not change). Everything is in 198.18.0.0/15:

    control ns <prefix>ctl   bridge fabric0 198.18.0.1/24 (the CA listens here)
    node i  ns <prefix>N     eth0 198.18.0.(10+i)/24, a veth to fabric0 (vnode<i> there)
                             bridge pods0 198.18.i.1/24; route 198.18.j.0/24 via
                             198.18.0.(10+j) for every other node j
    pod k on node i          eth0 198.18.i.(10+k)/24, default via 198.18.i.1, its veth
                             peer vpod<10+k> is a port of node i's pods0
    Service VIPs             198.19.0.10, .11, … (only the mesh's proxies route them)

Nodes are numbered in natural name order (node-2 before node-10); pods and
services take the lowest free address in document order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lab.spec import MAX_NODES, LabSpec, PodSpec
from nodeagent.objects import is_enrolled

DEFAULT_PREFIX = "tlab-"
NETNS_DIR = "/run/netns"  # where `ip netns` (and pyroute2) mount named namespaces
CONTROL_ADDRESS = "198.18.0.1"
SUBNET_PREFIXLEN = 24
FIRST_HOST = 10  # .1 is the gateway; .2-.9 stay free for whatever the lab needs later
LAST_HOST = 254
VIP_NET = "198.19.0"
CA_PORT = 15012
APP_PORT = 8080
FABRIC_BRIDGE = "fabric0"
POD_BRIDGE = "pods0"
UPLINK = "eth0"
POD_IFNAME = "eth0"


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    netns: str

    @property
    def address(self) -> str:
        return f"198.18.0.{FIRST_HOST + self.index}"

    @property
    def uplink(self) -> str:
        return UPLINK

    @property
    def fabric_port(self) -> str:
        """The uplink veth's other end, a port of fabric0 in the control namespace."""
        return f"vnode{self.index}"

    @property
    def pod_subnet(self) -> str:
        return f"198.18.{self.index}.0/{SUBNET_PREFIXLEN}"

    @property
    def gateway(self) -> str:
        return f"198.18.{self.index}.1"


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    service_account: str
    labels: Mapping[str, str]
    enrolled: bool

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def node_port(self) -> str:
        """The pod veth's other end, a port of pods0 in the node namespace (<= 15 chars)."""
        return f"vpod{self.ip.rsplit('.', 1)[1]}"

    @property
    def gateway(self) -> str:
        return self.ip.rsplit(".", 1)[0] + ".1"


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    vip: str
    ports: tuple[tuple[int, int], ...]  # (port, targetPort)
    selector: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPlan:
    prefix: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]

    @property
    def control_netns(self) -> str:
        return control_netns(self.prefix)

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)

    def pods_on(self, node: str) -> tuple[PodPlan, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def find_pods(self, ref: str) -> tuple[PodPlan, ...]:
        """Pods matching ``name`` or ``namespace/name``."""
        return tuple(p for p in self.pods if ref in (p.name, p.key))

    def routes(self, node: NodePlan) -> tuple[tuple[str, str], ...]:
        """(destination, via) for every other node's pods, over the fabric."""
        return tuple((other.pod_subnet, other.address) for other in self.nodes
                     if other.name != node.name)

    def netns_names(self) -> tuple[str, ...]:
        return (self.control_netns, *(n.netns for n in self.nodes),
                *(p.netns for p in self.pods))


def control_netns(prefix: str) -> str:
    return f"{prefix}ctl"


def plan_lab(spec: LabSpec, prefix: str = DEFAULT_PREFIX,
             previous: LabPlan | None = None) -> LabPlan:
    """Addresses for everything in ``spec``, keeping what ``previous`` already assigned."""
    nodes = _plan_nodes({p.node for p in spec.pods}, prefix, previous)
    by_name = {n.name: n for n in nodes}
    old_pods = {p.key: p for p in previous.pods} if previous else {}
    kept = {}
    for pod in spec.pods:
        old = old_pods.get(pod.key)
        if old is not None and old.node == pod.node:
            kept[pod.key] = (old.netns, old.ip)
    used_netns = {control_netns(prefix), *(n.netns for n in nodes),
                  *(netns for netns, _ in kept.values())}
    used_ips = {ip for _, ip in kept.values()}
    pods = []
    for pod in spec.pods:
        if pod.key in kept:
            netns, ip = kept[pod.key]
        else:
            netns = _pod_netns(pod, prefix, used_netns)
            ip = _free_host(f"198.18.{by_name[pod.node].index}", used_ips)
            used_netns.add(netns)
            used_ips.add(ip)
        enrolled = is_enrolled(pod.labels, spec.namespace_labels(pod.namespace))
        pods.append(PodPlan(pod.name, pod.namespace, pod.node, netns, ip,
                            pod.service_account, pod.labels, enrolled))
    return LabPlan(prefix, nodes, tuple(pods), _plan_services(spec, previous))


def natural_key(name: str) -> list[Any]:
    """node-2 sorts before node-10; digit runs compare as numbers."""
    parts: list[Any] = re.split(r"(\d+)", name)
    parts[1::2] = [int(p) for p in parts[1::2]]
    return parts


def _plan_nodes(names: set[str], prefix: str,
                previous: LabPlan | None) -> tuple[NodePlan, ...]:
    old = {n.name: n.index for n in previous.nodes} if previous else {}
    taken = {old[name] for name in names if name in old}
    nodes = []
    for name in sorted(names, key=natural_key):
        index = old.get(name)
        if index is None:
            index = next(i for i in range(1, MAX_NODES + 1) if i not in taken)
            taken.add(index)
        nodes.append(NodePlan(name, index, f"{prefix}{name}"))
    return tuple(nodes)


def _plan_services(spec: LabSpec, previous: LabPlan | None) -> tuple[ServicePlan, ...]:
    old = {s.key: s.vip for s in previous.services} if previous else {}
    used = {old[s.key] for s in spec.services if s.key in old}
    services = []
    for svc in spec.services:
        vip = old.get(svc.key)
        if vip is None:
            vip = _free_host(VIP_NET, used)
            used.add(vip)
        services.append(ServicePlan(svc.name, svc.namespace, vip, svc.ports, svc.selector))
    return tuple(services)


def _free_host(net24: str, used: set[str]) -> str:
    for host in range(FIRST_HOST, LAST_HOST + 1):
        address = f"{net24}.{host}"
        if address not in used:
            return address
    # spec.build_spec caps pods per node and services, so this means a bug here.
    raise AssertionError(f"no free address left in {net24}.0/24")


def _pod_netns(pod: PodSpec, prefix: str, used: set[str]) -> str:
    """``<prefix><pod name>``; a hash of namespace/name tells apart pods that share a name
    (or a pod named like a node)."""
    plain = f"{prefix}{pod.name}"
    if plain not in used:
        return plain
    digest = hashlib.sha256(pod.key.encode()).hexdigest()
    for length in range(6, len(digest) + 1):
        hashed = f"{prefix}{pod.name}-{digest[:length]}"
        if hashed not in used:
            return hashed
    raise AssertionError(f"no free namespace name for pod {pod.key}")


# lab.json holds the plan so `status` and `down` need not recompute it.

def plan_to_json(plan: LabPlan) -> dict[str, Any]:
    return {
        "prefix": plan.prefix,
        "nodes": [{"name": n.name, "index": n.index, "netns": n.netns} for n in plan.nodes],
        "pods": [{"name": p.name, "namespace": p.namespace, "node": p.node, "netns": p.netns,
                  "ip": p.ip, "service_account": p.service_account, "labels": dict(p.labels),
                  "enrolled": p.enrolled} for p in plan.pods],
        "services": [{"name": s.name, "namespace": s.namespace, "vip": s.vip,
                      "ports": [list(p) for p in s.ports], "selector": dict(s.selector)}
                     for s in plan.services],
    }


def plan_from_json(data: Mapping[str, Any]) -> LabPlan:
    return LabPlan(
        prefix=data["prefix"],
        nodes=tuple(NodePlan(**n) for n in data["nodes"]),
        pods=tuple(PodPlan(**p) for p in data["pods"]),
        services=tuple(ServicePlan(s["name"], s["namespace"], s["vip"],
                                   tuple((int(a), int(b)) for a, b in s["ports"]),
                                   s["selector"]) for s in data["services"]),
    )
