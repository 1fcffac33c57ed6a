"""Istio metrics: labels computed per connection, counters bumped at open and close."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from prometheus_client import generate_latest

from tunnel.metrics import MUTUAL_TLS, TCP_LABELS, ProxyMetrics, connection_labels
from tunnel.state import Workload

pytestmark = pytest.mark.unit


def _workload(name: str, ip: str, **labels: str) -> Workload:
    return Workload(uid=f"uid-{name}", name=name, namespace="bench", node="node-1", ip=ip,
                    service_account=name, labels=MappingProxyType(labels), enrolled=True)


CLIENT = _workload("client", "198.18.1.10", app="client", version="v1")
SERVER = _workload("server", "198.18.2.10", app="server")


def _labels(source: Workload | None = CLIENT, **kw: str) -> dict[str, str]:
    return connection_labels(
        reporter="source", source=source, source_principal="cluster.local/ns/bench/sa/client",
        destination=SERVER, destination_principal="cluster.local/ns/bench/sa/server",
        service=None, security_policy=MUTUAL_TLS, cluster="Kubernetes", **kw).as_dict()


def test_labels_name_both_peers_in_istio_terms() -> None:
    labels = _labels()
    assert set(labels) == set(TCP_LABELS)
    assert labels["source_workload"] == "client"
    assert labels["source_version"] == "v1"
    assert labels["destination_app"] == "server"
    assert labels["destination_version"] == "unknown"
    assert labels["destination_service"] == "unknown"
    assert labels["response_flags"] == "-"


def test_cached_labels_follow_every_input() -> None:
    first = _labels()
    assert _labels() == first
    assert _labels(response_flags="DENY")["response_flags"] == "DENY"
    # A new snapshot's workload (a new object) is looked at afresh, not taken
    # from the entry of the old one.
    relabelled = replace(CLIENT, labels=MappingProxyType({"app": "client", "version": "v2"}))
    assert _labels(relabelled)["source_version"] == "v2"
    assert _labels(None)["source_workload"] == "unknown"
    assert _labels() == first


def _sample(metrics: ProxyMetrics, name: str) -> float | None:
    text = generate_latest(metrics.registry).decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{")]
    return sum(values) if values else None


def test_counters_accumulate_per_connection() -> None:
    metrics = ProxyMetrics()
    labels = connection_labels(
        reporter="destination", source=CLIENT, source_principal=None, destination=SERVER,
        destination_principal=None, service=None, security_policy=MUTUAL_TLS, cluster="c")
    for _ in range(3):
        metrics.on_open(labels)
        metrics.on_close(labels, request_bytes=50, response_bytes=1000)
    assert _sample(metrics, "istio_tcp_connections_opened_total") == 3
    assert _sample(metrics, "istio_tcp_connections_closed_total") == 3
    assert _sample(metrics, "istio_tcp_received_bytes_total") == 150
    assert _sample(metrics, "istio_tcp_sent_bytes_total") == 3000


def test_a_connection_without_bytes_makes_no_byte_series() -> None:
    metrics = ProxyMetrics()
    labels = connection_labels(
        reporter="destination", source=None, source_principal=None, destination=SERVER,
        destination_principal=None, service=None, security_policy=MUTUAL_TLS, cluster="c",
        response_flags="DENY")
    metrics.on_open(labels)
    metrics.on_close(labels, request_bytes=0, response_bytes=0)
    assert _sample(metrics, "istio_tcp_connections_closed_total") == 1
    assert _sample(metrics, "istio_tcp_sent_bytes_total") is None
    assert _sample(metrics, "istio_tcp_received_bytes_total") is None
