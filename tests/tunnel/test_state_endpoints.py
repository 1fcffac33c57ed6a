"""MeshState.endpoints: a Service's selector, or the endpoint addresses its source lists."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from tunnel.state import MeshState, Service, ServicePort, Workload

pytestmark = pytest.mark.unit


def workload(name: str, ip: str, app: str = "web", ns: str = "demo") -> Workload:
    return Workload(uid=f"uid-{name}", name=name, namespace=ns, node="node-1", ip=ip,
                    service_account=name, labels=MappingProxyType({"app": app}),
                    enrolled=True)


def web(endpoint_ips: tuple[str, ...] | None = None) -> Service:
    return Service(name="web", namespace="demo", vip="10.96.0.10",
                   ports=(ServicePort(80, 8080),), selector=MappingProxyType({"app": "web"}),
                   endpoint_ips=endpoint_ips)


PODS = (workload("b", "10.1.0.12"), workload("a", "10.1.0.9"),
        workload("other", "10.1.0.13", app="db"), workload("elsewhere", "10.2.0.5", ns="prod"))


def names(state: MeshState, service: Service) -> list[str]:
    return [w.name for w in state.endpoints(service)]


def test_without_endpoint_ips_the_selector_decides() -> None:
    svc = web()
    assert names(MeshState(workloads=PODS, services=(svc,)), svc) == ["a", "b"]


def test_listed_addresses_win_over_the_selector_and_are_ordered_by_ip() -> None:
    # 10.1.0.13 does not match the selector, 10.1.0.12 does but is not listed
    # (not ready): the list is what counts. Ordered numerically, not as text.
    svc = web(("10.1.0.13", "10.1.0.9", "10.2.0.5", "10.1.0.9"))
    assert names(MeshState(workloads=PODS, services=(svc,)), svc) == ["a", "other", "elsewhere"]


def test_addresses_that_are_no_workload_are_skipped() -> None:
    svc = web(("192.0.2.1", "10.1.0.12"))
    assert names(MeshState(workloads=PODS, services=(svc,)), svc) == ["b"]


def test_an_empty_list_means_no_endpoints_not_the_selector() -> None:
    svc = web(())
    assert names(MeshState(workloads=PODS, services=(svc,)), svc) == []
