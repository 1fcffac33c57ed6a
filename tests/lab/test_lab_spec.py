"""The lab description: what it accepts, and the exact line it prints for what it does not."""

from __future__ import annotations

import textwrap

import pytest

from lab.errors import LabError
from lab.lifecycle import read_description
from lab.spec import build_spec, load_documents, merge, object_key, remove

pytestmark = pytest.mark.unit

NAMESPACE = "kind: Namespace\nmetadata: {name: demo}\n"


def check(text: str) -> None:
    build_spec(load_documents(textwrap.dedent(text), "lab.yaml"), "lab.yaml")


def error_of(text: str) -> str:
    with pytest.raises(LabError) as info:
        check(text)
    return str(info.value)


def test_default_lab_describes_two_nodes_five_pods_two_services() -> None:
    description = read_description(None)
    spec = build_spec(description.documents, description.source)
    assert {p.node for p in spec.pods} == {"node-1", "node-2"}
    assert [p.name for p in spec.pods] == [
        "frontend-1", "backend-1", "legacy-1", "frontend-2", "backend-2"]
    assert {p.name: p.service_account for p in spec.pods}["legacy-1"] == "legacy"
    assert [(s.name, s.ports) for s in spec.services] == [
        ("frontend", ((80, 8080),)), ("backend", ((80, 8080),))]
    assert spec.namespace_labels("demo") == {"trellis.dev/dataplane-mode": "ambient"}


def test_pod_defaults_namespace_and_service_account() -> None:
    spec = build_spec(load_documents("kind: Pod\nmetadata: {name: a}\nspec: {nodeName: n1}\n",
                                     "lab.yaml"), "lab.yaml")
    assert (spec.pods[0].namespace, spec.pods[0].service_account) == ("default", "default")


@pytest.mark.parametrize(("text", "message"), [
    (NAMESPACE + "---\nkind: Pod\nmetadata: {name: x, namespace: demo}\n",
     "lab.yaml: Pod demo/x: spec.nodeName: missing"),
    (NAMESPACE + "---\nkind: Pod\nmetadata: {name: x, namespace: demo}\nspec: {}\n",
     "lab.yaml: Pod demo/x: spec.nodeName: missing"),
    ("kind: Pod\nmetadata: {name: x}\nspec: {nodeName: Node_1}\n",
     "lab.yaml: Pod default/x: spec.nodeName: must be a lowercase DNS label (a-z, 0-9, '-', "
     "at most 63 characters), got 'Node_1'"),
    ("kind: Pod\nmetadata: {name: x}\nspec: {nodeName: ctl}\n",
     "lab.yaml: Pod default/x: spec.nodeName: 'ctl' is reserved for the lab's control namespace"),
    ("kind: Pod\nmetadata: {name: x, namespace: shop}\nspec: {nodeName: n1}\n",
     "lab.yaml: Pod shop/x: metadata.namespace: namespace 'shop' is not declared "
     "(add a Namespace document)"),
    ("kind: Pod\nmetadata: {name: x, labels: {version: 2}}\nspec: {nodeName: n1}\n",
     "lab.yaml: Pod default/x: metadata.labels.version: must be a string (quote it), got 2"),
    ("kind: Pod\nmetadata: {name: x}\nspec: {nodeName: n1, serviceAccountName: 7}\n",
     "lab.yaml: Pod default/x: spec.serviceAccountName: must be a lowercase DNS label "
     "(a-z, 0-9, '-', at most 63 characters), got 7"),
    ("metadata: {name: x}\n", "lab.yaml: document 1: kind: missing"),
    ("kind: Pod\nspec: {nodeName: n1}\n", "lab.yaml: Pod (document 1): metadata.name: missing"),
    ("kind: Pod\nmetadata: {name: x}\nspec: {nodeName: n1}\n---\n"
     "kind: Pod\nmetadata: {name: x}\nspec: {nodeName: n2}\n",
     "lab.yaml: Pod default/x: metadata.name: duplicate (also document 1)"),
    ("- just\n- a list\n", "lab.yaml: document 1: must be a mapping, got list"),
    ("kind: Pod\nmetadata: {name: x\n", "lab.yaml: line 3, column 1: expected ',' or '}', "
                                         "but got '<stream end>'"),
    (NAMESPACE, "lab.yaml: no Pod documents: a lab needs at least one pod "
                "(its spec.nodeName makes the node)"),
])
def test_pod_errors_name_file_object_and_field(text: str, message: str) -> None:
    assert error_of(text) == message


POD = "kind: Pod\nmetadata: {name: a}\nspec: {nodeName: n1}\n---\n"


@pytest.mark.parametrize(("service", "message"), [
    ("kind: Service\nmetadata: {name: s}\n",
     "lab.yaml: Service default/s: spec.ports: missing"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: []}\n",
     "lab.yaml: Service default/s: spec.ports: must be a non-empty list"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{targetPort: 80}]}\n",
     "lab.yaml: Service default/s: spec.ports[0].port: missing"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 70000}]}\n",
     "lab.yaml: Service default/s: spec.ports[0].port: must be a port number from 1 to 65535, "
     "got 70000"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: http}]}\n",
     "lab.yaml: Service default/s: spec.ports[0].targetPort: must be a port number from 1 "
     "to 65535, got 'http'"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 53, protocol: UDP}]}\n",
     "lab.yaml: Service default/s: spec.ports[0].protocol: only TCP is supported, got 'UDP'"),
    ("kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 80}]}\n",
     "lab.yaml: Service default/s: spec.ports[1].port: duplicate port 80"),
])
def test_service_errors_name_file_object_and_field(service: str, message: str) -> None:
    assert error_of(POD + service) == message


def test_service_target_port_defaults_to_port() -> None:
    spec = build_spec(load_documents(
        POD + "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 9000}]}\n",
        "lab.yaml"), "lab.yaml")
    assert spec.services[0].ports == ((9000, 9000),)


def test_other_kinds_pass_through_unchecked() -> None:
    check(POD + "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                "metadata: {name: p, namespace: anywhere}\nspec: {action: DENY}\n")


def test_merge_replaces_by_kind_namespace_name_and_appends_new() -> None:
    a1 = {"kind": "Pod", "metadata": {"name": "a"}, "spec": {"nodeName": "n1"}}
    a2 = {"kind": "Pod", "metadata": {"name": "a", "namespace": "default"},
          "spec": {"nodeName": "n2"}}
    b = {"kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 1}]}}
    assert merge([a1], [a2, b], "f.yaml") == [a2, b]


def test_remove_cascades_from_a_deleted_namespace_and_reports_unknown_keys() -> None:
    ns = {"kind": "Namespace", "metadata": {"name": "shop"}}
    pod = {"kind": "Pod", "metadata": {"name": "a", "namespace": "shop"}}
    other = {"kind": "Pod", "metadata": {"name": "b"}}
    kept, missing = remove([ns, pod, other], [("Namespace", "", "shop"), ("Pod", "x", "y")])
    assert kept == [other]
    assert missing == [("Pod", "x", "y")]


def test_object_key_defaults_namespace_only_for_namespaced_lab_kinds() -> None:
    assert object_key({"kind": "Pod", "metadata": {"name": "a"}}, "f", 1) == (
        "Pod", "default", "a")
    assert object_key({"kind": "Namespace", "metadata": {"name": "a", "namespace": "x"}},
                      "f", 1) == ("Namespace", "", "a")
    assert object_key({"kind": "AuthorizationPolicy", "metadata": {"name": "a"}}, "f", 1) == (
        "AuthorizationPolicy", "", "a")
