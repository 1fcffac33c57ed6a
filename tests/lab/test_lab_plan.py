"""The address plan is a pure function: the default lab's addresses, names and stability."""

from __future__ import annotations

import pytest

from lab.lifecycle import read_description
from lab.plan import LabPlan, plan_from_json, plan_lab, plan_to_json
from lab.spec import LabSpec, build_spec, load_documents

pytestmark = pytest.mark.unit


def spec_of(text: str) -> LabSpec:
    return build_spec(load_documents(text, "lab.yaml"), "lab.yaml")


def pod(name: str, node: str, namespace: str = "default") -> str:
    return (f"kind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
            f"spec: {{nodeName: {node}}}\n---\n")


@pytest.fixture
def default_plan() -> LabPlan:
    description = read_description(None)
    return plan_lab(build_spec(description.documents, description.source))


def test_default_nodes(default_plan: LabPlan) -> None:
    assert default_plan.control_netns == "tlab-ctl"
    assert [(n.name, n.netns, n.address, n.uplink, n.pod_subnet, n.gateway, n.fabric_port)
            for n in default_plan.nodes] == [
        ("node-1", "tlab-node-1", "198.18.0.11", "eth0", "198.18.1.0/24", "198.18.1.1", "vnode1"),
        ("node-2", "tlab-node-2", "198.18.0.12", "eth0", "198.18.2.0/24", "198.18.2.1", "vnode2"),
    ]


def test_default_pods(default_plan: LabPlan) -> None:
    assert [(p.name, p.node, p.netns, p.ip, p.gateway, p.node_port, p.enrolled)
            for p in default_plan.pods] == [
        ("frontend-1", "node-1", "tlab-frontend-1", "198.18.1.10", "198.18.1.1", "vpod10", True),
        ("backend-1", "node-1", "tlab-backend-1", "198.18.1.11", "198.18.1.1", "vpod11", True),
        ("legacy-1", "node-1", "tlab-legacy-1", "198.18.1.12", "198.18.1.1", "vpod12", False),
        ("frontend-2", "node-2", "tlab-frontend-2", "198.18.2.10", "198.18.2.1", "vpod10", True),
        ("backend-2", "node-2", "tlab-backend-2", "198.18.2.11", "198.18.2.1", "vpod11", True),
    ]


def test_default_services_and_routes(default_plan: LabPlan) -> None:
    assert [(s.key, s.vip, s.ports) for s in default_plan.services] == [
        ("demo/frontend", "198.19.0.10", ((80, 8080),)),
        ("demo/backend", "198.19.0.11", ((80, 8080),)),
    ]
    node1, node2 = default_plan.nodes
    assert default_plan.routes(node1) == (("198.18.2.0/24", "198.18.0.12"),)
    assert default_plan.routes(node2) == (("198.18.1.0/24", "198.18.0.11"),)


def test_every_address_is_in_the_lab_range(default_plan: LabPlan) -> None:
    import ipaddress
    lab_range = ipaddress.ip_network("198.18.0.0/15")
    addresses = ([n.address for n in default_plan.nodes] + [p.ip for p in default_plan.pods]
                 + [s.vip for s in default_plan.services])
    assert all(ipaddress.ip_address(a) in lab_range for a in addresses)


def test_nodes_are_numbered_in_natural_name_order() -> None:
    plan = plan_lab(spec_of(pod("a", "node-10") + pod("b", "node-2")))
    assert [(n.name, n.index) for n in plan.nodes] == [("node-2", 1), ("node-10", 2)]


def test_prefix_names_every_namespace() -> None:
    plan = plan_lab(spec_of(pod("a", "n1")), prefix="tlab-t1-")
    assert plan.netns_names() == ("tlab-t1-ctl", "tlab-t1-n1", "tlab-t1-a")


def test_pods_sharing_a_name_or_named_like_a_node_get_distinct_namespaces() -> None:
    text = ("kind: Namespace\nmetadata: {name: shop}\n---\n"
            + pod("web", "n1") + pod("web", "n1", "shop") + pod("n1", "n1"))
    names = [p.netns for p in plan_lab(spec_of(text)).pods]
    assert names[0] == "tlab-web"
    assert names[1].startswith("tlab-web-") and len(names[1]) == len("tlab-web-") + 6
    assert names[2].startswith("tlab-n1-")
    assert len(set(names)) == 3


def test_previous_plan_keeps_addresses_and_fills_the_lowest_gap() -> None:
    first = plan_lab(spec_of(pod("a", "n1") + pod("b", "n1") + pod("c", "n1")))
    without_a = plan_lab(spec_of(pod("b", "n1") + pod("c", "n1")), previous=first)
    assert [(p.name, p.ip) for p in without_a.pods] == [("b", "198.18.1.11"), ("c", "198.18.1.12")]
    with_d = plan_lab(spec_of(pod("b", "n1") + pod("c", "n1") + pod("d", "n1")),
                      previous=without_a)
    assert {p.name: p.ip for p in with_d.pods}["d"] == "198.18.1.10"


def test_a_pod_that_changes_node_gets_an_address_there() -> None:
    first = plan_lab(spec_of(pod("a", "n1") + pod("b", "n2")))
    moved = plan_lab(spec_of(pod("a", "n2") + pod("b", "n2")), previous=first)
    assert {p.name: p.ip for p in moved.pods} == {"a": "198.18.2.11", "b": "198.18.2.10"}


def test_enrollment_follows_pod_label_then_namespace_label() -> None:
    text = ("kind: Namespace\nmetadata: {name: m, labels: {trellis.dev/dataplane-mode: ambient}}"
            "\n---\nkind: Pod\nmetadata: {name: in, namespace: m}\nspec: {nodeName: n}\n---\n"
            "kind: Pod\nmetadata: {name: out, namespace: m, labels: "
            "{trellis.dev/dataplane-mode: none}}\nspec: {nodeName: n}\n---\n"
            "kind: Pod\nmetadata: {name: own, labels: {trellis.dev/dataplane-mode: ambient}}\n"
            "spec: {nodeName: n}\n---\n" + pod("plain", "n"))
    assert {p.name: p.enrolled for p in plan_lab(spec_of(text)).pods} == {
        "in": True, "out": False, "own": True, "plain": False}


def test_plan_survives_its_json_form(default_plan: LabPlan) -> None:
    assert plan_from_json(plan_to_json(default_plan)) == default_plan
