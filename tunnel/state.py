"""What the proxy knows about the mesh: workloads and services, as one immutable snapshot.

The node agent builds a new ``MeshState`` whenever its source changes and hands it
to the proxy whole; the proxy never mutates it, so a lookup on the hot path needs
no lock and always sees one consistent version.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity

DATAPLANE_LABEL = "trellis.dev/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod (or VM) as the mesh sees it."""

    uid: str
    name: str
    namespace: str
    node: str
    ip: str
    service_account: str
    labels: Mapping[str, str]
    # True when the pod is enrolled in the mesh (label on pod or namespace); only
    # enrolled workloads speak HBONE, the rest are reached in plain TCP.
    enrolled: bool
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # Path of the pod's network namespace when the source knows it (the lab and
    # VM file mode set the annotation trellis.dev/netns); on Kubernetes the agent
    # finds it from the pod's cgroup instead, so this stays empty.
    netns: str = ""
    # The pod's cgroup v2 directory when the source knows it (the lab sets the
    # annotation trellis.dev/cgroup); the eBPF redirection attaches there.
    cgroup: str = ""

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    vip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    # The endpoint addresses the source lists for this Service (its ready
    # EndpointSlice endpoints); None means the source has none, and the selector
    # over the workloads decides, as the EndpointSlice controller would.
    endpoint_ips: tuple[str, ...] | None = None

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def target_port(self, port: int) -> int | None:
        for p in self.ports:
            if p.port == port:
                return p.target_port
        return None


@dataclass(frozen=True, slots=True)
class MeshState:
    """A consistent snapshot of every workload and service, indexed for the hot path."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    namespace_labels: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({}))
    version: int = 0
    _by_ip: Mapping[str, Workload] = field(init=False, repr=False, compare=False)
    _by_vip: Mapping[str, Service] = field(init=False, repr=False, compare=False)
    _endpoints: Mapping[str, tuple[Workload, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The first workload with an IP keeps it: the sources already resolve a
        # shared IP (nodeagent/objects.py), and a dict comprehension would let the
        # last one silently take it instead.
        by_ip: dict[str, Workload] = {}
        for w in self.workloads:
            if w.ip:
                by_ip.setdefault(w.ip, w)
        by_vip = {s.vip: s for s in self.services if s.vip}
        endpoints = {s.key: _select(s, self.workloads) if s.endpoint_ips is None
                     else _listed(s.endpoint_ips, by_ip) for s in self.services}
        object.__setattr__(self, "_by_ip", MappingProxyType(by_ip))
        object.__setattr__(self, "_by_vip", MappingProxyType(by_vip))
        object.__setattr__(self, "_endpoints", MappingProxyType(endpoints))

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)

    def service_by_vip(self, vip: str) -> Service | None:
        return self._by_vip.get(vip)

    def endpoints(self, service: Service) -> tuple[Workload, ...]:
        """Workloads backing ``service``, in a stable order (by IP) for round-robin."""
        return self._endpoints.get(service.key, ())

    def workloads_on(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.node == node)


def _select(service: Service, workloads: Iterable[Workload]) -> tuple[Workload, ...]:
    if not service.selector:
        return ()
    chosen = [
        w for w in workloads
        if w.namespace == service.namespace and w.ip
        and all(w.labels.get(k) == v for k, v in service.selector.items())
    ]
    return tuple(sorted(chosen, key=lambda w: ipaddress.ip_address(w.ip)))


def _listed(ips: Iterable[str], by_ip: Mapping[str, Workload]) -> tuple[Workload, ...]:
    # An address that is no known workload is skipped: the proxy picks HBONE or
    # plain TCP by the workload's enrollment, and HBONE needs the workload's
    # identity (namespace, service account); a bare address has neither.
    chosen = {ip: by_ip[ip] for ip in ips if ip in by_ip}
    return tuple(sorted(chosen.values(), key=lambda w: ipaddress.ip_address(w.ip)))
