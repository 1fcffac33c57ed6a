"""Prometheus metrics of the proxy, under Istio's names and labels.

Labels are computed once per connection (``connection_labels``) and the counters
are bumped at open and close only, so the byte-copy path never touches metrics.
Each proxy owns its ``CollectorRegistry``: tests can run several in one process.

Both steps are cached, because they run on every new connection and their
inputs repeat: the same few (source, destination) pairs account for nearly all
connections. ``connection_labels`` remembers its answers per set of inputs, and
``ProxyMetrics`` keeps the four counter children of each label set, since
prometheus-client's ``labels()`` validates and converts all 27 values and takes
a lock on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# Answers of `connection_labels`, keyed by its inputs. Workloads and Services are
# immutable but not hashable (their labels are mappings), so they are keyed by
# id() and the entry keeps the objects themselves: an id cannot be reused while
# its object is alive, and each hit checks identity. A new MeshState brings new
# objects; the cache is simply emptied when it grows past a bound. Module-level
# on purpose: it is derived data, holds no configuration and is never wrong.
_LABEL_CACHE_MAX = 4096
_label_cache: dict[tuple[Any, ...], tuple[object, object, object, ConnectionLabels]] = {}


def connection_labels(*, reporter: str, source: Workload | None, source_principal: str | None,
                      destination: Workload | None, destination_principal: str | None,
                      service: Service | None, security_policy: str, cluster: str,
                      response_flags: str = "-") -> ConnectionLabels:
    key = (reporter, id(source), source_principal, id(destination), destination_principal,
           id(service), security_policy, cluster, response_flags)
    hit = _label_cache.get(key)
    if hit is not None and hit[0] is source and hit[1] is destination and hit[2] is service:
        return hit[3]
    labels = _compute_labels(reporter, source, source_principal, destination,
                             destination_principal, service, security_policy, cluster,
                             response_flags)
    if len(_label_cache) >= _LABEL_CACHE_MAX:
        _label_cache.clear()
    _label_cache[key] = (source, destination, service, labels)
    return labels


def _compute_labels(reporter: str, source: Workload | None, source_principal: str | None,
                    destination: Workload | None, destination_principal: str | None,
                    service: Service | None, security_policy: str, cluster: str,
                    response_flags: str) -> ConnectionLabels:
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
        # One series per invalid policy, removed when it is fixed or deleted:
        # policies are cluster objects, so names are bounded as for `denials`.
        self.invalid_policies = Gauge("trellis_policy_invalid",
                                      "1 for each policy that failed validation, by what "
                                      "is enforced in its place", ["policy", "fallback"],
                                      registry=r)
        self.connect_failures = Counter("trellis_connect_failures",
                                        "Connections that failed before any byte moved",
                                        ["direction", "reason"], registry=r)
        # Limits and refusals (tunnel/limits.py); reasons are `limits.Refusal` values.
        self.refusals = Counter("trellis_connections_refused",
                                "Connections refused before any byte moved: a target "
                                "that would loop through the proxy, or a limit reached",
                                ["direction", "reason"], registry=r)
        self.active_connections = Gauge(
            "trellis_connections_active", "Connections being set up or relayed: on the "
            "node, and in the pod that has the most", ["scope"], registry=r)
        self.connection_limit = Gauge("trellis_connections_limit",
                                      "max_connections_per_node / _per_pod in force",
                                      ["scope"], registry=r)
        self.idle_closed = Counter("trellis_connections_idle_closed",
                                   "Relays closed after relay_idle_timeout_s without a byte",
                                   ["direction"], registry=r)
        self.write_pauses = Counter("trellis_relay_write_pauses",
                                    "Times a relayed socket's write buffer reached "
                                    "relay_write_high_water_bytes (reading the other side "
                                    "paused)", registry=r)
        self.write_paused = Gauge("trellis_relay_write_paused_connections",
                                  "Relays whose socket write buffer is at its cap now",
                                  registry=r)
        # HBONE abuse guards (tunnel/handshake_limit.py, tunnel/hbone.py); every reason
        # is an enum value: HandshakeFailure, hbone.PeerFault, or "handler_limit".
        self.handshake_failures = Counter(
            "trellis_hbone_handshake_failures", "Connections to 15008 that never became a "
            "tunnel: handshake timeout, pending-handshake bound, TLS or identity refusal",
            ["reason"], registry=r)
        self.handshakes_pending = Gauge(
            "trellis_hbone_handshakes_pending", "TLS handshakes on 15008 not finished yet "
            "(bounded by max_pending_handshakes_per_node)", registry=r)
        self.hbone_peer_errors = Counter(
            "trellis_hbone_peer_errors", "Inbound HBONE connections ended with a GOAWAY "
            "for the peer's fault: protocol error, control-frame flood, rapid reset",
            ["reason"], registry=r)
        self.hbone_streams_refused = Counter(
            "trellis_hbone_streams_refused", "CONNECT streams refused (REFUSED_STREAM) "
            "while max_streams_per_connection handlers of the connection were busy",
            ["reason"], registry=r)
        # Children per label set, for each counter; bounded by the label sets the
        # registry itself keeps forever. The byte counters get a child only once
        # bytes moved, as before (a denied connection shows no byte series).
        self._opened: dict[tuple[str, ...], Any] = {}
        self._closed: dict[tuple[str, ...], Any] = {}
        self._sent: dict[tuple[str, ...], Any] = {}
        self._received: dict[tuple[str, ...], Any] = {}

    @staticmethod
    def _child(cache: dict[tuple[str, ...], Any], counter: Counter,
               values: tuple[str, ...]) -> Any:
        child = cache.get(values)
        if child is None:
            child = cache[values] = counter.labels(*values)
        return child

    def on_open(self, labels: ConnectionLabels) -> None:
        self._child(self._opened, self.opened, labels.values).inc()

    def on_close(self, labels: ConnectionLabels, *, request_bytes: int,
                 response_bytes: int) -> None:
        # Istio's meaning, for either reporter: "received" counts the request
        # direction (source → destination), "sent" the response direction.
        values = labels.values
        self._child(self._closed, self.closed, values).inc()
        if response_bytes:
            self._child(self._sent, self.sent, values).inc(response_bytes)
        if request_bytes:
            self._child(self._received, self.received, values).inc(request_bytes)
