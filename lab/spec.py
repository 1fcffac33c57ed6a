"""The lab description: Kubernetes-style YAML documents, checked once, into typed specs.

A lab is described the way a cluster is: ``Namespace``, ``Pod`` (with
``spec.nodeName``, which also names the lab's nodes) and ``Service`` (with
``spec.ports``) documents. Any other kind (``AuthorizationPolicy`` …) is kept
as-is for the node agents to read. The lab assigns pod IPs and Service VIPs
itself, so ``status.podIP`` and ``spec.clusterIP`` in the input are ignored.

Every check happens here, before the lab touches the kernel, and a failure is
one line naming the file, the object and the field::

    lab.yaml: Pod demo/x: spec.nodeName: missing

Pure: no I/O beyond parsing the text handed in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from lab.errors import LabError

# Capacities follow from the address plan (lab/plan.py): node i's uplink is
# 198.18.0.(10+i), its pods 198.18.i.10-254, VIPs 198.19.0.10-254.
MAX_NODES = 244
MAX_PODS_PER_NODE = 245
MAX_SERVICES = 245

# Node N lives in network namespace <prefix>N, and <prefix>ctl is the control namespace.
RESERVED_NODE_NAMES = frozenset({"ctl"})

DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"

# RFC 1123 labels: what Kubernetes allows for namespaces, service accounts and
# (here) pod and node names, which also become namespace and SPIFFE path parts.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

Key = tuple[str, str, str]  # (kind, namespace, name): what apply/delete match on
Doc = Mapping[str, Any]


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str
    node: str
    service_account: str
    labels: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    ports: tuple[tuple[int, int], ...]  # (port, targetPort)
    selector: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabSpec:
    namespaces: tuple[NamespaceSpec, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...]
    # Every document as given, in order; rendering the workloads file starts from these.
    documents: tuple[Doc, ...]

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        for ns in self.namespaces:
            if ns.name == name:
                return ns.labels
        return {}


def load_documents(text: str, source: str) -> list[dict[str, Any]]:
    """The mappings in a multi-document YAML text; empty documents are skipped."""
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise LabError(f"{source}: {where}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise LabError(f"{source}: not valid YAML: {exc}") from None
    docs = []
    for number, doc in enumerate(raw, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise LabError(f"{source}: document {number}: must be a mapping, "
                           f"got {type(doc).__name__}")
        docs.append(doc)
    return docs


def object_key(doc: Doc, source: str, number: int) -> Key:
    """(kind, namespace, name), checked; ``number`` names the document in errors."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise LabError(f"{source}: document {number}: kind: missing")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise LabError(f"{source}: {kind} (document {number}): metadata.name: missing")
    namespace = meta.get("namespace", "")
    if not isinstance(namespace, str):
        raise LabError(f"{source}: {kind} {meta['name']}: metadata.namespace: must be a string")
    if kind == "Namespace":
        namespace = ""
    elif kind in ("Pod", "Service") and not namespace:
        namespace = DEFAULT_NAMESPACE
    return (kind, namespace, meta["name"])


def describe(key: Key) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def build_spec(docs: Sequence[Doc], source: str) -> LabSpec:
    """Check every document and the lab as a whole; raise LabError on the first problem."""
    first_seen: dict[Key, int] = {}
    keyed: list[tuple[Doc, _Where]] = []
    for number, doc in enumerate(docs, start=1):
        key = object_key(doc, source, number)
        if key in first_seen:
            raise LabError(f"{source}: {describe(key)}: metadata.name: "
                           f"duplicate (also document {first_seen[key]})")
        first_seen[key] = number
        keyed.append((doc, _Where(source, key)))
    namespaces = [_namespace(doc, w) for doc, w in keyed if w.key[0] == "Namespace"]
    declared = {ns.name for ns in namespaces} | {DEFAULT_NAMESPACE}
    pods = [_pod(doc, w, declared) for doc, w in keyed if w.key[0] == "Pod"]
    services = [_service(doc, w, declared) for doc, w in keyed if w.key[0] == "Service"]
    _check_capacity(pods, services, source)
    return LabSpec(tuple(namespaces), tuple(pods), tuple(services), tuple(docs))


def merge(current: Iterable[Doc], applied: Iterable[Doc], source: str) -> list[Doc]:
    """``apply``: an applied document replaces the one with its key, or is added at the end."""
    result = list(current)
    index = {object_key(d, "lab state", n + 1): n for n, d in enumerate(result)}
    for number, doc in enumerate(applied, start=1):
        key = object_key(doc, source, number)
        if key in index:
            result[index[key]] = doc
        else:
            index[key] = len(result)
            result.append(doc)
    return result


def remove(current: Iterable[Doc], keys: Iterable[Key]) -> tuple[list[Doc], list[Key]]:
    """``delete``: the documents left, and the keys that matched nothing.

    Deleting a Namespace deletes what lives in it, as Kubernetes does.
    """
    keys = list(keys)
    wanted = set(keys)
    gone_namespaces = {name for kind, _, name in wanted if kind == "Namespace"}
    kept, found = [], set()
    for number, doc in enumerate(current, start=1):
        key = object_key(doc, "lab state", number)
        if key in wanted or (key[1] and key[1] in gone_namespaces):
            found.add(key)
            continue
        kept.append(doc)
    return kept, [k for k in keys if k not in found]


@dataclass(frozen=True)
class _Where:
    """Which object a check is about, so every error line names file and object."""

    source: str
    key: Key

    def fail(self, field: str, problem: str) -> LabError:
        return LabError(f"{self.source}: {describe(self.key)}: {field}: {problem}")


def _namespace(doc: Doc, where: _Where) -> NamespaceSpec:
    name = _dns_label(doc["metadata"]["name"], where, "metadata.name")
    return NamespaceSpec(name, _string_map(doc["metadata"].get("labels"), where,
                                           "metadata.labels"))


def _pod(doc: Doc, where: _Where, declared: set[str]) -> PodSpec:
    _, namespace, name = where.key
    _dns_label(name, where, "metadata.name")
    _check_declared(namespace, declared, where)
    spec = doc.get("spec")
    if spec is None:
        raise where.fail("spec.nodeName", "missing")
    if not isinstance(spec, Mapping):
        raise where.fail("spec", "must be a mapping")
    if "nodeName" not in spec:
        raise where.fail("spec.nodeName", "missing")
    node = _dns_label(spec["nodeName"], where, "spec.nodeName")
    if node in RESERVED_NODE_NAMES:
        raise where.fail("spec.nodeName", f"{node!r} is reserved for the lab's control namespace")
    account = spec.get("serviceAccountName", DEFAULT_SERVICE_ACCOUNT)
    account = _dns_label(account, where, "spec.serviceAccountName")
    labels = _string_map(doc["metadata"].get("labels"), where, "metadata.labels")
    return PodSpec(name, namespace, node, account, labels)


def _service(doc: Doc, where: _Where, declared: set[str]) -> ServiceSpec:
    _, namespace, name = where.key
    _dns_label(name, where, "metadata.name")
    _check_declared(namespace, declared, where)
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise where.fail("spec.ports", "missing")
    ports = spec.get("ports")
    if not isinstance(ports, list) or not ports:
        raise where.fail("spec.ports", "missing" if ports is None else "must be a non-empty list")
    parsed = tuple(_service_port(p, where, f"spec.ports[{i}]") for i, p in enumerate(ports))
    seen: set[int] = set()
    for i, (port, _) in enumerate(parsed):
        if port in seen:
            raise where.fail(f"spec.ports[{i}].port", f"duplicate port {port}")
        seen.add(port)
    selector = _string_map(spec.get("selector"), where, "spec.selector")
    return ServiceSpec(name, namespace, parsed, selector)


def _service_port(item: Any, where: _Where, field: str) -> tuple[int, int]:
    if not isinstance(item, Mapping):
        raise where.fail(field, "must be a mapping with port and targetPort")
    if "port" not in item:
        raise where.fail(f"{field}.port", "missing")
    port = _port_number(item["port"], where, f"{field}.port")
    target = _port_number(item.get("targetPort", port), where, f"{field}.targetPort")
    protocol = item.get("protocol", "TCP")
    if protocol != "TCP":
        raise where.fail(f"{field}.protocol", f"only TCP is supported, got {protocol!r}")
    return port, target


def _port_number(value: Any, where: _Where, field: str) -> int:
    # bool is an int in Python; `port: yes` is a YAML mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise where.fail(field, f"must be a port number from 1 to 65535, got {value!r}")
    return value


def _dns_label(value: Any, where: _Where, field: str) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value):
        raise where.fail(field, f"must be a lowercase DNS label (a-z, 0-9, '-', at most "
                                f"63 characters), got {value!r}")
    return value


def _string_map(value: Any, where: _Where, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise where.fail(field, "must be a mapping")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise where.fail(field, f"key {key!r} must be a non-empty string")
        if not isinstance(item, str):
            # YAML reads `version: 1` or `on: yes` as numbers and booleans.
            raise where.fail(f"{field}.{key}", f"must be a string (quote it), got {item!r}")
    return dict(value)


def _check_declared(namespace: str, declared: set[str], where: _Where) -> None:
    if namespace not in declared:
        raise where.fail("metadata.namespace",
                         f"namespace {namespace!r} is not declared (add a Namespace document)")


def _check_capacity(pods: Sequence[PodSpec], services: Sequence[ServiceSpec],
                    source: str) -> None:
    if not pods:
        raise LabError(f"{source}: no Pod documents: a lab needs at least one pod "
                       "(its spec.nodeName makes the node)")
    per_node: dict[str, int] = {}
    for pod in pods:
        per_node[pod.node] = per_node.get(pod.node, 0) + 1
        where = _Where(source, ("Pod", pod.namespace, pod.name))
        if len(per_node) > MAX_NODES:
            raise where.fail("spec.nodeName", f"more than {MAX_NODES} nodes")
        if per_node[pod.node] > MAX_PODS_PER_NODE:
            raise where.fail("spec.nodeName",
                             f"more than {MAX_PODS_PER_NODE} pods on node {pod.node!r}")
    if len(services) > MAX_SERVICES:
        last = services[MAX_SERVICES]
        raise _Where(source, ("Service", last.namespace, last.name)).fail(
            "metadata.name", f"more than {MAX_SERVICES} services")
