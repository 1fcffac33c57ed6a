"""EndpointSlices in nodeagent.objects: a Service's endpoints from its slices, ready
ones only, merged over slices; bad slices skipped with an error naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.objects import parse_documents, parse_yaml

pytestmark = pytest.mark.unit


def pod(name: str, ip: str, app: str = "web") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
            "spec": {"nodeName": "node-1"}, "status": {"podIP": ip}}


def service(name: str = "web", vip: str = "198.19.0.10", ns: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": vip, "selector": {"app": name},
                     "ports": [{"port": 80, "targetPort": 8080}]}}


def endpoint(ip: object, ready: object = True) -> dict[str, Any]:
    return {"addresses": [ip], "conditions": {} if ready is None else {"ready": ready}}


def slice_(name: str, *endpoints: dict[str, Any], service_name: str | None = "web",
           ns: str = "demo", address_type: object = "IPv4") -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": service_name} if service_name else {}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "addressType": address_type, "endpoints": list(endpoints)}


PODS = (pod("web-1", "198.18.0.11"), pod("web-2", "198.18.0.12"), pod("web-3", "198.18.0.13"),
        pod("db-1", "198.18.0.21", app="db"))


def endpoints(*docs: object, **kw: Any) -> dict[str, list[str]]:
    snap = parse_documents([*PODS, *docs], source="test", **kw)
    assert snap.errors == ()
    return {s.name: [w.name for w in snap.state.endpoints(s)] for s in snap.state.services}


def test_without_slices_a_file_keeps_the_selector() -> None:
    assert endpoints(service()) == {"web": ["web-1", "web-2", "web-3"]}


def test_slices_are_merged_and_only_ready_endpoints_count() -> None:
    # web-3 matches the selector but is not ready; db-1 does not match but is listed.
    assert endpoints(
        service(),
        slice_("web-a", endpoint("198.18.0.12", ready=None), endpoint("198.18.0.11", False),
               endpoint("198.18.0.13", False)),
        # The same endpoint ready in a second slice (a split under way) is ready.
        slice_("web-b", endpoint("198.18.0.21"), endpoint("198.18.0.11")),
    ) == {"web": ["web-1", "web-2", "db-1"]}


def test_with_slices_a_service_without_any_has_no_endpoints() -> None:
    # One slice in the input puts every Service on slices: the rule cannot be
    # chosen per Service, or a Service whose slices are late would use its selector.
    got = endpoints(service(), service("db", "198.19.0.11"),
                    slice_("db-a", endpoint("198.18.0.21"), service_name="db"))
    assert got == {"web": [], "db": ["db-1"]}


def test_the_api_server_source_uses_slices_even_when_there_are_none() -> None:
    assert endpoints(service(), endpoint_slices=True) == {"web": []}


@pytest.mark.parametrize("other", [
    slice_("x", endpoint("198.18.0.11"), service_name=None),          # no Service label
    slice_("x", endpoint("198.18.0.11"), ns="prod"),                  # web in another namespace
    slice_("x", endpoint("fd00::1"), address_type="IPv6"),            # dual-stack: not ours
    slice_("x", {"addresses": ["web-1.example"]}, address_type="FQDN"),
], ids=["unlabelled", "other-namespace", "ipv6", "fqdn"])
def test_slices_that_are_not_the_services_are_ignored(other: dict[str, Any]) -> None:
    assert endpoints(service(), slice_("web-a", endpoint("198.18.0.12")), other) == \
        {"web": ["web-2"]}


@pytest.mark.parametrize(("doc", "error"), [
    (slice_("s", endpoint("198.18.0.11"), address_type=None),
     "EndpointSlice demo/s: addressType: missing"),
    (slice_("s", endpoint("not-an-ip")),
     "EndpointSlice demo/s: endpoints[0].addresses[0]: 'not-an-ip' is not an IPv4 address"),
    (slice_("s", {"addresses": []}),
     "EndpointSlice demo/s: endpoints[0].addresses: expected a non-empty list, got list"),
    (slice_("s", {"addresses": "198.18.0.11"}),
     "EndpointSlice demo/s: endpoints[0].addresses: expected a non-empty list, got str"),
    (slice_("s", endpoint("198.18.0.11", ready="yes")),
     "EndpointSlice demo/s: endpoints[0].conditions.ready: 'yes' is not true or false"),
    ({**slice_("s"), "endpoints": {"addresses": []}},
     "EndpointSlice demo/s: endpoints: expected a list, got dict"),
], ids=["no-address-type", "bad-ip", "no-addresses", "addresses-not-a-list", "bad-ready",
        "endpoints-not-a-list"])
def test_a_bad_slice_is_skipped_with_an_error_naming_the_field(doc: object, error: str) -> None:
    snap = parse_documents([*PODS, service(), doc, slice_("good", endpoint("198.18.0.13"))],
                           source="test")
    assert snap.errors == (error,)
    (web,) = snap.state.services
    assert [w.name for w in snap.state.endpoints(web)] == ["web-3"]


def test_a_duplicate_slice_is_reported_on_the_later_one() -> None:
    snap = parse_documents([*PODS, service(), slice_("s", endpoint("198.18.0.11")),
                            slice_("s", endpoint("198.18.0.12"))], source="test")
    assert snap.errors == ("EndpointSlice demo/s: metadata.name: 'demo/s' is already used by "
                           "EndpointSlice demo/s",)
    assert [w.name for w in snap.state.endpoints(snap.state.services[0])] == ["web-1"]


def test_a_yaml_file_with_slices() -> None:
    snap = parse_yaml("""
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
status: {podIP: 198.18.0.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}   # selector-less
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-manual, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
  - addresses: [198.18.0.11]
""", source="mesh.yaml")
    assert snap.errors == ()
    (web,) = snap.state.services
    assert web.endpoint_ips == ("198.18.0.11",)
    assert [w.name for w in snap.state.endpoints(web)] == ["web-1"]
