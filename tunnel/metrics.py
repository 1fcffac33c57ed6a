"""Prometheus metrics of the proxy, under Istio's names and labels.

Labels are computed once per connection (``connection_labels``) and the counters
are bumped at open and close only, so the byte-copy path never touches metrics.
Each proxy owns its ``CollectorRegistry``: tests can run several in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from tunnel.state import Service, Workload

_PEER_FIELDS = ("workload", "workload_namespace", "principal", "app", "version",
                "canonical_service", "canonical_revision", "cluster")
TCP_LABELS = (
    "reporter",
    *(f"source_{f}" for f in _PEER_FIELDS),
    *(f"destination_{f}" for f in _PEER_FIELDS),
    "destination_service", "destination_service_name", "destination_service_namespace",
    "request_protocol", "response_flags", "connection_security_policy",
)
UNKNOWN = "unknown"

MUTUAL_TLS = "mutual_tls"
PLAINTEXT = "unknown"  # Istio's label value for a connection without mTLS


def _peer_labels(prefix: str, workload: Workload | None, principal: str | None,
                 cluster: str) -> dict[str, str]:
    if workload is None:
        values = dict.fromkeys(_PEER_FIELDS, UNKNOWN)
        values["principal"] = principal or UNKNOWN
        return {f"{prefix}_{k}": v for k, v in values.items()}
    labels = workload.labels
    canonical = labels.get("service.istio.io/canonical-name", labels.get("app", workload.name))
    revision = labels.get("service.istio.io/canonical-revision", labels.get("version", "latest"))
    values = {
        "workload": workload.name,
        "workload_namespace": workload.namespace,
        "principal": principal or UNKNOWN,
        "app": labels.get("app", UNKNOWN),
        "version": labels.get("version", UNKNOWN),
        "canonical_service": canonical,
        "canonical_revision": revision,
        "cluster": cluster,
    }
    return {f"{prefix}_{k}": v for k, v in values.items()}


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    values: tuple[str, ...]

    def as_dict(self) -> dict[str, str]:
        return dict(zip(TCP_LABELS, self.values, strict=True))


def connection_labels(*, reporter: str, source: Workload | None, source_principal: str | None,
                      destination: Workload | None, destination_principal: str | None,
                      service: Service | None, security_policy: str, cluster: str,
                      response_flags: str = "-") -> ConnectionLabels:
    labels = {"reporter": reporter}
    labels |= _peer_labels("source", source, source_principal, cluster)
    labels |= _peer_labels("destination", destination, destination_principal, cluster)
    labels |= {
        "destination_service": service.hostname if service else UNKNOWN,
        "destination_service_name": service.name if service else UNKNOWN,
        "destination_service_namespace": service.namespace if service else UNKNOWN,
        "request_protocol": "tcp",
        "response_flags": response_flags,
        "connection_security_policy": security_policy,
    }
    return ConnectionLabels(tuple(labels[name] for name in TCP_LABELS))


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "0.1.0"):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened",
                              TCP_LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed",
                              TCP_LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent in the response direction",
                            TCP_LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes",
                                "Bytes received in the request direction", TCP_LABELS,
                                registry=r)
        build = Info("istio_build", "Build of the proxy", registry=r)
        build.info({"component": "trellis-tunnel", "tag": version})
        self.pods = Gauge("trellis_enrolled_pods", "Pods this proxy serves", registry=r)
        self.hbone_connections = Gauge("trellis_hbone_pool_connections",
                                       "Open outbound HBONE connections", registry=r)
        self.denials = Counter("trellis_policy_denials",
                               "Inbound connections denied (or closed) by authorization",
                               ["policy", "reason"], registry=r)
        self.connect_failures = Counter("trellis_connect_failures",
                                        "Connections that failed before any byte moved",
                                        ["direction", "reason"], registry=r)

    def on_open(self, labels: ConnectionLabels) -> None:
        self.opened.labels(*labels.values).inc()

    def on_close(self, labels: ConnectionLabels, *, request_bytes: int,
                 response_bytes: int) -> None:
        # Istio's meaning, for either reporter: "received" counts the request
        # direction (source → destination), "sent" the response direction.
        self.closed.labels(*labels.values).inc()
        if response_bytes:
            self.sent.labels(*labels.values).inc(response_bytes)
        if request_bytes:
            self.received.labels(*labels.values).inc(request_bytes)
