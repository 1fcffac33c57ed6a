"""Parsing Kubernetes-style documents into a Snapshot: typed state, errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.objects import SourceError, load_yaml_file, parse_documents, parse_yaml

pytestmark = pytest.mark.unit

MODE = "trellis.dev/dataplane-mode"


def pod(name: str, ip: str | None = "198.18.0.10", *, ns: str | None = "demo",
        labels: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if ns is not None:
        meta["namespace"] = ns
    meta.update(extra.pop("metadata", {}))
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                           "spec": {"nodeName": "node-1", "serviceAccountName": "sa-" + name,
                                    **extra.pop("spec", {})},
                           "status": {"podIP": ip} if ip is not None else {}}
    return doc


def namespace(name: str, mode: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {MODE: mode} if mode else {}}}


def service(name: str, vip: Any = "198.19.0.10", ports: Any = None,
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"clusterIP": vip, "ports": [{"port": 80, "targetPort": 8080}]
                     if ports is None else ports, "selector": {"app": name}, **spec}}


def parse(*docs: object, **kw: Any):  # type: ignore[no-untyped-def]
    return parse_documents(docs, source="test", **kw)


def test_a_pod_becomes_a_workload_with_defaults() -> None:
    snap = parse(pod("web-1", ns=None, labels={"app": "web"}))
    assert snap.errors == ()
    (w,) = snap.state.workloads
    assert (w.name, w.namespace, w.uid, w.ip, w.node) == \
        ("web-1", "default", "default/web-1", "198.18.0.10", "node-1")
    assert w.service_account == "sa-web-1"
    assert dict(w.labels) == {"app": "web"}
    assert w.identity.uri == "spiffe://cluster.local/ns/default/sa/sa-web-1"
    assert not w.enrolled and w.netns == ""


def test_explicit_fields_are_kept() -> None:
    doc = pod("web-1", metadata={"uid": "abc-123",
                                 "annotations": {"trellis.dev/netns": "/run/netns/web-1"}})
    del doc["spec"]["serviceAccountName"]
    (w,) = parse(doc, trust_domain="example.org").state.workloads
    assert (w.uid, w.netns, w.service_account) == ("abc-123", "/run/netns/web-1", "default")
    assert w.identity.uri == "spiffe://example.org/ns/demo/sa/default"


@pytest.mark.parametrize(("ns_mode", "pod_mode", "enrolled"), [
    (None, None, False),
    (None, "ambient", True),
    ("ambient", None, True),
    ("ambient", "none", False),
    ("ambient", "something-else", True),
    ("none", "ambient", True),
    ("something-else", None, False),
])
def test_enrollment_by_pod_or_namespace_label(ns_mode: str | None, pod_mode: str | None,
                                              enrolled: bool) -> None:
    labels = {MODE: pod_mode} if pod_mode else {}
    # The namespace comes after the pod: order in the stream must not matter.
    snap = parse(pod("a", labels=labels), namespace("demo", ns_mode))
    assert snap.state.workloads[0].enrolled is enrolled
    assert dict(snap.state.namespace_labels["demo"]) == ({MODE: ns_mode} if ns_mode else {})


def test_a_pending_pod_has_no_ip() -> None:
    (w,) = parse(pod("a", ip=None)).state.workloads
    assert w.ip == ""


@pytest.mark.parametrize(("doc", "error"), [
    (pod("backend-2", ip="1.2.3"),
     "Pod demo/backend-2: status.podIP: '1.2.3' is not an IPv4 address"),
    (pod("b", ip="::1"), "Pod demo/b: status.podIP: '::1' is not an IPv4 address"),
    (pod("b", ip=3323068417), "Pod demo/b: status.podIP: 3323068417 is not an IPv4 address"),
    (pod("b", labels={"version": 1}),
     "Pod demo/b: metadata.labels['version']: 1 is not a string (quote it in YAML)"),
    (pod("b", spec={"serviceAccountName": "Bad_SA"}),
     "Pod demo/b: spec.serviceAccountName: 'Bad_SA' is not a valid Kubernetes name"),
    (pod("b", ns="Demo"), "Pod Demo/b: metadata.namespace: 'Demo' is not a valid Kubernetes name"),
    (pod("b", metadata={"annotations": {"trellis.dev/netns": "web"}}),
     "Pod demo/b: metadata.annotations['trellis.dev/netns']: 'web' is not an absolute path"),
    ({"kind": "Pod", "metadata": {"namespace": "demo"}},
     "Pod in document 1: metadata.name: missing"),
    ({"kind": "Pod", "metadata": {"name": "x"}, "spec": ["nodeName"]},
     "Pod default/x: spec: expected a mapping, got list"),
    (service("backend", ports=[{"port": "x"}]),
     "Service demo/backend: spec.ports[0].port: 'x' is not a port number"),
    (service("backend", ports=[{"port": 80}, {"port": 70000}]),
     "Service demo/backend: spec.ports[1].port: 70000 is not a port number"),
    (service("backend", ports=[{"port": 80, "targetPort": "http"}]),
     "Service demo/backend: spec.ports[0].targetPort: 'http' is a named port; "
     "only a numeric targetPort is supported"),
    (service("backend", ports=[{"port": 80, "protocol": "ICMP"}]),
     "Service demo/backend: spec.ports[0].protocol: 'ICMP' is not one of TCP, UDP, SCTP"),
    (service("backend", vip="10.0.0"),
     "Service demo/backend: spec.clusterIP: '10.0.0' is not an IPv4 address"),
    (service("backend", ports={"port": 80}),
     "Service demo/backend: spec.ports: expected a list, got dict"),
    ({"kind": "Namespace", "metadata": {"name": "demo", "labels": ["a"]}},
     "Namespace demo: metadata.labels: expected a mapping, got list"),
    ({"metadata": {"name": "x"}}, "document 1: kind: missing"),
    (["not", "a", "mapping"], "document 1: expected a mapping, got list"),
])
def test_a_bad_object_is_skipped_with_an_error_naming_the_field(doc: object, error: str) -> None:
    snap = parse(doc, pod("good", ip="198.18.0.99"))
    assert snap.errors == (error,)
    assert [w.name for w in snap.state.workloads] == ["good"]


def test_duplicates_are_reported_on_the_later_object() -> None:
    snap = parse(pod("a", ip="198.18.0.1"), pod("b", ip="198.18.0.1"),
                 pod("a", ip="198.18.0.2"), namespace("demo"), namespace("demo"),
                 service("s1", vip="198.19.0.1"), service("s2", vip="198.19.0.1"),
                 service("s3", vip="198.18.0.1"))
    assert snap.errors == (
        "Namespace demo: metadata.name: 'demo' is declared twice",
        "Pod demo/b: status.podIP: '198.18.0.1' is already used by Pod demo/a (kept: running "
        "first, then newest, then smallest uid)",
        "Pod demo/a: metadata.uid: 'demo/a' is already used by Pod demo/a",
        "Service demo/s2: spec.clusterIP: '198.19.0.1' is already used by Service demo/s1",
        "Service demo/s3: spec.clusterIP: '198.18.0.1' is already used by Pod demo/a",
    )
    assert [w.name for w in snap.state.workloads] == ["a"]
    assert [s.name for s in snap.state.services] == ["s1"]


def _phase(doc: dict[str, Any], phase: str, created: str = "",
           deleting: bool = False) -> dict[str, Any]:
    doc["status"]["phase"] = phase
    if created:
        doc["metadata"]["creationTimestamp"] = created
    if deleting:
        doc["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return doc


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_pod_is_left_out_and_its_ip_goes_to_the_new_pod(phase: str) -> None:
    """The IP-reuse attack: a finished pod still listed with the IP a new pod got must
    not decide who answers there, whichever of the two the source lists first."""
    old = _phase(pod("old", ip="198.18.0.7", labels={MODE: "ambient"}), phase,
                 "2026-01-01T00:00:00Z")
    new = _phase(pod("new", ip="198.18.0.7"), "Pending", "2025-01-01T00:00:00Z")
    for docs in ((old, new), (new, old)):
        snap = parse(*docs)
        assert snap.errors == ()
        assert [w.name for w in snap.state.workloads] == ["new"]
        found = snap.state.workload_by_ip("198.18.0.7")
        assert found is not None and found.service_account == "sa-new"
    # The control: the same pod while still running is kept (and wins the IP).
    snap = parse(_phase(pod("old", ip="198.18.0.7"), "Running"), new)
    assert [w.name for w in snap.state.workloads] == ["old"]


def test_a_pod_being_deleted_is_kept_only_while_it_has_an_ip() -> None:
    snap = parse(_phase(pod("going", ip=None), "Running", deleting=True),
                 _phase(pod("draining", ip="198.18.0.8"), "Running", deleting=True))
    assert snap.errors == ()
    assert [w.name for w in snap.state.workloads] == ["draining"]


def test_a_shared_ip_goes_to_the_running_then_newest_pod_in_any_order() -> None:
    older = _phase(pod("older", ip="198.18.0.9"), "Running", "2026-01-01T00:00:00Z")
    newer = _phase(pod("newer", ip="198.18.0.9"), "Running", "2026-02-01T00:00:00+00:00")
    pending = _phase(pod("pending", ip="198.18.0.9"), "Pending", "2026-03-01T00:00:00Z")
    for docs in ((older, newer, pending), (pending, newer, older), (newer, pending, older)):
        snap = parse(*docs)
        assert [w.name for w in snap.state.workloads] == ["newer"]
        assert sorted(e.split(":")[0] for e in snap.errors) == ["Pod demo/older",
                                                                "Pod demo/pending"]
        assert all("already used by Pod demo/newer" in e for e in snap.errors)


def test_a_bad_creation_timestamp_names_the_field() -> None:
    snap = parse(_phase(pod("x"), "Running", "yesterday"))
    assert snap.errors == ("Pod demo/x: metadata.creationTimestamp: 'yesterday' is not an "
                           "RFC 3339 time",)


def test_a_rejected_pod_reserves_nothing() -> None:
    snap = parse(pod("a", ip="198.18.0.1"), pod("b", ip="198.18.0.1"),
                 pod("b", ip="198.18.0.2"))
    assert [w.key for w in snap.state.workloads] == ["demo/a", "demo/b"]


def test_a_service_and_its_endpoints() -> None:
    svc = service("web", ports=[{"port": 80, "targetPort": 8080, "name": "http"},
                                {"port": 443}])
    snap = parse(svc, pod("web-2", ip="198.18.0.20", labels={"app": "web"}),
                 pod("web-1", ip="198.18.0.3", labels={"app": "web"}),
                 pod("other", ip="198.18.0.4"))
    assert snap.errors == ()
    (s,) = snap.state.services
    assert (s.vip, s.target_port(80), s.target_port(443), s.ports[0].name) == \
        ("198.19.0.10", 8080, 443, "http")
    assert [w.name for w in snap.state.endpoints(s)] == ["web-1", "web-2"]
    assert snap.state.service_by_vip("198.19.0.10") is s


def test_a_headless_service_has_no_vip() -> None:
    snap = parse(service("a", vip="None"), service("b", vip=None))
    assert snap.errors == ()
    assert [s.vip for s in snap.state.services] == ["", ""]


def test_policies_pass_through_and_unknown_kinds_are_ignored() -> None:
    istio = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "p1"}, "spec": {"action": "DENY", "rules": [{}]}}
    ours = {"apiVersion": "security.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p2"}}
    other = {"apiVersion": "example.com/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "p3"}}
    snap = parse(istio, {"kind": "ConfigMap", "metadata": {"name": "x"}}, ours, other,
                 {"apiVersion": "apps/v1", "kind": "Deployment"})
    assert snap.policies == (istio, ours)
    assert snap.errors == ()


def test_a_list_is_unpacked_and_empty_documents_are_skipped() -> None:
    snap = parse(None, {"kind": "List", "items": [pod("a"), "junk"]})
    assert [w.name for w in snap.state.workloads] == ["a"]
    assert snap.errors == ("document 2: items[1]: expected a mapping, got str",)


def test_version_and_source_are_recorded() -> None:
    snap = parse_documents([], source="pods.yaml", version=7)
    assert (snap.state.version, snap.source) == (7, "pods.yaml")


def test_a_bad_trust_domain_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="trust domain"):
        parse(trust_domain="Not Valid")


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text("kind: Pod\nmetadata:\n  name: a\n   bad: indent\n")
    with pytest.raises(SourceError, match=rf"{path}: line 4, column 7: "):
        load_yaml_file(path)


def test_bytes_that_are_not_utf8_name_the_position(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_bytes(b"kind: Pod\nmetadata: {name: \xff}\n")
    with pytest.raises(SourceError, match=rf"{path}: line 2, column 18: not UTF-8"):
        load_yaml_file(path)


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("kind: Pod\nstatus:\n  startTime: 2026-12-07T42:04:12Z\n", "line 3, column 14",
     "hour must be in 0..23"),
    ("kind: Pod\nmetadata: {name: !!int web}\n", "line 2, column 18",
     "invalid literal for int"),
    ("kind: !!float Pod\n", "line 1, column 7", "could not convert string to float"),
    ("metadata:\n  !!timestamp namespace: demo\n", "line 2, column 3",
     "is not a valid !!timestamp"),
    ("kind: Pod\nmetadata: {name: !!int }\n", "line 2, column 18", "string index out of range"),
    ("kind: Pod\nspec: {hostNetwork: !!bool maybe}\n", "line 2, column 21", "'maybe'"),
], ids=["timestamp-out-of-range", "int-tag", "float-tag", "timestamp-tag", "empty-int-tag",
        "bool-tag"])
def test_a_value_yaml_cannot_construct_names_its_line_and_column(
        text: str, where: str, problem: str) -> None:
    # Found by tests/fuzz/fuzz_k8s_objects.py: PyYAML's constructors raise ValueError,
    # AttributeError, IndexError or KeyError, not a YAMLError, for these; they escaped
    # parse_yaml, and with them the file source's loop, which promises to keep the last
    # good snapshot.
    with pytest.raises(SourceError, match=rf"^pods.yaml: {where}: .*{problem}"):
        parse_yaml(text, source="pods.yaml")


def test_a_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        load_yaml_file(tmp_path / "nope.yaml")


def test_a_multi_document_file(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text(yaml.safe_dump_all([namespace("demo", "ambient"), pod("a"), service("a")]))
    snap = load_yaml_file(path)
    assert snap.errors == () and snap.source == str(path)
    assert snap.state.workloads[0].enrolled
    assert len(snap.state.services) == 1


def test_parse_yaml_accepts_text() -> None:
    snap = parse_yaml("---\n" + yaml.safe_dump(pod("a")), source="inline")
    assert [w.name for w in snap.state.workloads] == ["a"]


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=8),
                     st.sampled_from(["198.18.0.1", "198.19.0.1", "ambient", "none", "Pod",
                                      "demo", "/run/netns/x"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["name", "namespace", "labels", "port", "targetPort",
                                     "podIP", "clusterIP", "ports", "uid", MODE]),
                    inner, max_size=4)), max_leaves=12)
_documents = st.fixed_dictionaries(
    {"kind": st.sampled_from(["Pod", "Service", "Namespace", "List", "Other", 3])},
    optional={"metadata": _values, "spec": _values, "status": _values, "items": _values})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_documents, _values), max_size=6))
def test_any_input_gives_a_snapshot_never_an_exception(docs: list[object]) -> None:
    snap = parse_documents(docs, source="fuzz")
    ips = [w.ip for w in snap.state.workloads if w.ip]
    assert len(ips) == len(set(ips))
    assert all(isinstance(e, str) and e for e in snap.errors)
    for w in snap.state.workloads:
        assert w.identity  # every kept pod has a valid identity
