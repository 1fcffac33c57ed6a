"""Kubernetes-style YAML documents → one typed ``Snapshot`` of the mesh.

The rules, in one place:

- Kinds read: ``Pod``, ``Namespace``, ``Service``, ``EndpointSlice``, and
  ``AuthorizationPolicy`` from ``security.istio.io/*`` or ``security.trellis.dev/*``
  (passed through raw for the policy loader). ``kind: List`` is unpacked.
  Other kinds are ignored, as kubectl output is full of them.
- A bad object is skipped with one error naming kind, ``namespace/name`` and
  the field path; everything else in the stream is kept, so one typo cannot
  take the whole node out of the mesh.
- A pod is enrolled when its label ``trellis.dev/dataplane-mode`` is
  ``ambient``, or its namespace's is and the pod's is not ``none``.
- A finished pod (``status.phase`` Succeeded or Failed) is left out, as is a
  pod being deleted that has no IP left: neither runs, so neither is enrolled,
  answers at an address, or may get a certificate (the CA reads the same
  snapshot). Its IP may already belong to a new pod.
- Two pods claiming one IP (the API server's view can lag a reuse): the
  running one wins, then the newer (``metadata.creationTimestamp``), then the
  smaller uid, whatever the order of the input; the other is reported and
  skipped.
- Pod uids and ``namespace/name`` keys are unique, as are Service keys; pod IPs
  and Service VIPs share one address space (the proxy looks both up by
  destination). Pods claim first; otherwise the later duplicate is the one
  reported and skipped.
- Service endpoints: when the input has EndpointSlices (always, from the API
  server), each Service gets the ready addresses of every slice labelled
  ``kubernetes.io/service-name: <its name>`` in its namespace, merged; a Service
  with no slice has none. A YAML file without slices keeps the selector rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity
from nodeagent.object_fields import FieldError, Fields, ipv4, kind_of, port_number
from nodeagent.pod_status import PodFacts, resolve_shared_ips, timestamp
from policy.safe_yaml import FastSafeLoader
from tunnel.state import AMBIENT, DATAPLANE_LABEL, NONE, MeshState, Service, ServicePort, Workload

NETNS_ANNOTATION = "trellis.dev/netns"
CGROUP_ANNOTATION = "trellis.dev/cgroup"
POLICY_GROUPS = ("security.istio.io/", "security.trellis.dev/")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_PROTOCOLS = ("TCP", "UDP", "SCTP")

_EMPTY: Mapping[str, str] = MappingProxyType({})


class SourceError(Exception):
    """A whole source is unusable (unreadable, not YAML); the message says where."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: MeshState
    # Raw AuthorizationPolicy documents, untouched: the policy package owns their schema.
    policies: tuple[dict[str, Any], ...] = ()
    errors: tuple[str, ...] = ()
    source: str = ""


def _is_identity(namespace: str, service_account: str, trust_domain: str) -> bool:
    try:
        Identity.of(namespace, service_account, trust_domain)
    except InvalidIdentity:
        return False
    return True


def _check_names(namespace: str, service_account: str, trust_domain: str) -> None:
    """Fail now, with a field path, rather than later when a certificate is requested."""
    if not _is_identity(namespace, "default", trust_domain):
        raise FieldError("metadata.namespace", f"{namespace!r} is not a valid Kubernetes name")
    if not _is_identity(namespace, service_account, trust_domain):
        raise FieldError("spec.serviceAccountName",
                   f"{service_account!r} is not a valid Kubernetes name")


@dataclass(frozen=True, slots=True)
class _Doc:
    where: str  # "document 3" or "document 3 items[1]", for objects without a name
    body: Mapping[str, Any]

    @property
    def kind(self) -> object:
        return self.body.get("kind")

    def label(self) -> str:
        meta = self.body.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        ns = meta.get("namespace") if isinstance(meta, Mapping) else None
        if not isinstance(name, str) or not name:
            return f"{self.kind} in {self.where}"
        if self.kind == "Namespace":
            return f"Namespace {name}"
        return f"{self.kind} {ns if isinstance(ns, str) and ns else 'default'}/{name}"


def _flatten(docs: Iterable[object], errors: list[str]) -> Iterator[_Doc]:
    for i, body in enumerate(docs, start=1):
        if body is None:  # an empty document, e.g. a trailing '---'
            continue
        if not isinstance(body, Mapping):
            errors.append(f"document {i}: expected a mapping, got {kind_of(body)}")
            continue
        if body.get("kind") != "List":
            yield _Doc(f"document {i}", body)
            continue
        items = body.get("items") or []
        if not isinstance(items, list):
            errors.append(f"document {i}: items: expected a list, got {kind_of(items)}")
            continue
        for j, item in enumerate(items):
            if isinstance(item, Mapping):
                yield _Doc(f"document {i} items[{j}]", item)
            else:
                errors.append(f"document {i}: items[{j}]: expected a mapping, got {kind_of(item)}")


def _is_policy(doc: _Doc) -> bool:
    api = doc.body.get("apiVersion")
    return (doc.kind == "AuthorizationPolicy" and isinstance(api, str)
            and api.startswith(POLICY_GROUPS))


def _namespace(doc: _Doc) -> tuple[str, Mapping[str, str]]:
    f = Fields(doc.body)
    return f.text("metadata.name"), f.text_map("metadata.labels")


def is_enrolled(pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> bool:
    """Istio ambient's rule, the one copy (the lab plans with it too): a pod labelled
    ambient is in; one labelled none is out; any other follows its namespace."""
    mode = pod_labels.get(DATAPLANE_LABEL)
    if mode == AMBIENT:
        return True
    return mode != NONE and ns_labels.get(DATAPLANE_LABEL) == AMBIENT


def _pod_facts(doc: _Doc, namespaces: Mapping[str, Mapping[str, str]],
               trust_domain: str) -> PodFacts:
    f = Fields(doc.body)
    return PodFacts(doc.label(), _pod(doc, namespaces, trust_domain),
                    phase=f.text("status.phase", ""),
                    created=timestamp(f.get("metadata.creationTimestamp"),
                                      "metadata.creationTimestamp"),
                    deleting=f.get("metadata.deletionTimestamp") not in (None, ""))


def _pod(doc: _Doc, namespaces: Mapping[str, Mapping[str, str]], trust_domain: str) -> Workload:
    f = Fields(doc.body)
    name = f.text("metadata.name")
    ns = f.text("metadata.namespace", "default")
    labels = f.text_map("metadata.labels")
    annotations = f.text_map("metadata.annotations")
    sa = f.text("spec.serviceAccountName", "default")
    _check_names(ns, sa, trust_domain)
    raw_ip = f.get("status.podIP")
    netns = annotations.get(NETNS_ANNOTATION, "")
    if netns and not netns.startswith("/"):
        raise FieldError(f"metadata.annotations[{NETNS_ANNOTATION!r}]",
                   f"{netns!r} is not an absolute path")
    cgroup = annotations.get(CGROUP_ANNOTATION, "")
    if cgroup and not cgroup.startswith("/"):
        raise FieldError(f"metadata.annotations[{CGROUP_ANNOTATION!r}]",
                   f"{cgroup!r} is not an absolute path")
    return Workload(
        uid=f.text("metadata.uid", f"{ns}/{name}"),
        name=name,
        namespace=ns,
        node=f.text("spec.nodeName", ""),
        # A pending pod has no IP yet: it is known, but nothing can reach it.
        ip=ipv4(raw_ip, "status.podIP") if raw_ip not in (None, "") else "",
        service_account=sa,
        labels=labels,
        # A hostNetwork pod shares the node's namespace: redirecting "its" traffic
        # would redirect the node's, so it is never enrolled (istio-cni skips it too).
        enrolled=is_enrolled(labels, namespaces.get(ns, _EMPTY))
        and f.get("spec.hostNetwork") is not True,
        trust_domain=trust_domain,
        netns=netns,
        cgroup=cgroup,
    )


def _service_port(p: Fields) -> ServicePort:
    port = port_number(p.get("port"), p.path("port"))
    target = p.get("targetPort")
    if target is None:
        target = port
    elif isinstance(target, str):
        raise FieldError(p.path("targetPort"),
                   f"{target!r} is a named port; only a numeric targetPort is supported")
    protocol = p.text("protocol", "TCP")
    if protocol not in _PROTOCOLS:
        raise FieldError(p.path("protocol"), f"{protocol!r} is not one of {', '.join(_PROTOCOLS)}")
    return ServicePort(port=port, target_port=port_number(target, p.path("targetPort")),
                       name=p.text("name", ""), protocol=protocol)


def _service(doc: _Doc) -> Service:
    f = Fields(doc.body)
    vip = f.get("spec.clusterIP")
    return Service(
        name=f.text("metadata.name"),
        namespace=f.text("metadata.namespace", "default"),
        # Headless services ('None') have no VIP; they still select endpoints.
        vip="" if vip in (None, "", "None") else ipv4(vip, "spec.clusterIP"),
        ports=tuple(_service_port(p) for p in f.items("spec.ports")),
        selector=f.text_map("spec.selector"),
    )


@dataclass(frozen=True, slots=True)
class _Slice:
    key: str  # its own "namespace/name"
    service: str  # "namespace/name" of the Service it serves; "" for none
    ready: tuple[str, ...]


def _endpoint_slice(doc: _Doc) -> _Slice:
    f = Fields(doc.body)
    name = f.text("metadata.name")
    ns = f.text("metadata.namespace", "default")
    service = f.text_map("metadata.labels").get(SERVICE_NAME_LABEL, "")
    address_type = f.text("addressType")
    ready: list[str] = []
    for e in f.items("endpoints"):
        addresses = e.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            raise FieldError(e.path("addresses"),
                             f"expected a non-empty list, got {kind_of(addresses)}")
        condition = e.get("conditions.ready")
        if condition is not None and not isinstance(condition, bool):
            raise FieldError(e.path("conditions.ready"), f"{condition!r} is not true or false")
        # The mesh is IPv4: the IPv6 (dual-stack) and FQDN slices are not errors,
        # just not ours. A missing ready condition means ready (the API's rule).
        if address_type != "IPv4":
            continue
        ips = [ipv4(a, e.path(f"addresses[{i}]")) for i, a in enumerate(addresses)]
        if condition is not False:
            ready += ips
    return _Slice(f"{ns}/{name}", f"{ns}/{service}" if service else "", tuple(ready))


def _with_endpoints(services: Iterable[Service], slices: Iterable[_Slice]) -> list[Service]:
    """Each Service's ready addresses over all its slices; an address ready in any
    slice is ready (during a slice split the same endpoint is briefly in two)."""
    merged: dict[str, set[str]] = {}
    for piece in slices:
        merged.setdefault(piece.service, set()).update(piece.ready)
    return [replace(s, endpoint_ips=tuple(sorted(merged.get(s.key, ()),
                                                 key=ipaddress.ip_address)))
            for s in services]


class _Unique:
    """First come, first kept: a later object reusing any claimed value is reported."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], str] = {}

    def claim(self, owner: str, claims: Iterable[tuple[str, str, str]]) -> None:
        """``claims`` are (scope, field path, value); all are checked before any is kept,
        so a rejected object reserves nothing."""
        wanted = [(scope, path, value) for scope, path, value in claims if value]
        for scope, path, value in wanted:
            first = self._owners.get((scope, value))
            if first is not None:
                raise FieldError(path, f"{value!r} is already used by {first}")
        for scope, _path, value in wanted:
            self._owners[scope, value] = owner


def parse_documents(docs: Iterable[object], *, source: str,
                    trust_domain: str = DEFAULT_TRUST_DOMAIN, version: int = 0,
                    endpoint_slices: bool | None = None) -> Snapshot:
    """Parse every document; never raises for bad content (see the module rules).

    ``endpoint_slices``: True when the source serves EndpointSlices (the API
    server: a Service without slices then has no endpoints), None to decide by
    whether the documents hold any (a YAML file)."""
    Identity.of("default", "default", trust_domain)  # a bad trust domain is a caller bug
    errors: list[str] = []
    objects = list(_flatten(docs, errors))
    for doc in objects:
        if doc.kind is None:
            errors.append(f"{doc.where}: kind: missing")

    namespaces: dict[str, Mapping[str, str]] = {}
    for doc in (d for d in objects if d.kind == "Namespace"):
        try:
            name, labels = _namespace(doc)
            if name in namespaces:
                raise FieldError("metadata.name", f"{name!r} is declared twice")
            namespaces[name] = labels
        except FieldError as bad:
            errors.append(f"{doc.label()}: {bad}")

    workloads: list[Workload] = []
    services: list[Service] = []
    slices: list[_Slice] = []
    unique = _Unique()
    pods: list[PodFacts] = []
    for doc in (d for d in objects if d.kind == "Pod"):
        try:
            facts = _pod_facts(doc, namespaces, trust_domain)
        except FieldError as bad:
            errors.append(f"{doc.label()}: {bad}")
            continue
        if not facts.gone:
            pods.append(facts)
    for facts in resolve_shared_ips(pods, errors):
        pod = facts.workload
        try:
            # Pod IPs and Service VIPs share one scope: the proxy looks both up
            # by destination address, so an overlap would make one unreachable.
            unique.claim(facts.label, [("address", "status.podIP", pod.ip),
                                             ("uid", "metadata.uid", pod.uid),
                                             ("pod", "metadata.name", pod.key)])
            workloads.append(pod)
        except FieldError as bad:
            errors.append(f"{facts.label}: {bad}")
    for doc in objects:
        try:
            if doc.kind == "Service":
                svc = _service(doc)
                unique.claim(doc.label(), [("address", "spec.clusterIP", svc.vip),
                                           ("service", "metadata.name", svc.key)])
                services.append(svc)
            elif doc.kind == "EndpointSlice":
                piece = _endpoint_slice(doc)
                unique.claim(doc.label(), [("endpointslice", "metadata.name", piece.key)])
                slices.append(piece)
        except FieldError as bad:
            errors.append(f"{doc.label()}: {bad}")

    if endpoint_slices or (endpoint_slices is None
                           and any(d.kind == "EndpointSlice" for d in objects)):
        services = _with_endpoints(services, slices)
    state = MeshState(
        workloads=tuple(workloads),
        services=tuple(services),
        namespace_labels=MappingProxyType(namespaces),
        version=version,
    )
    policies = tuple(dict(d.body) for d in objects if _is_policy(d))
    return Snapshot(state=state, policies=policies, errors=tuple(errors), source=source)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise SourceError(f"{source}: line {line}, column {column}: not UTF-8") from err


def parse_yaml(data: bytes | str, *, source: str, trust_domain: str = DEFAULT_TRUST_DOMAIN,
               version: int = 0) -> Snapshot:
    """Parse a multi-document YAML stream; bad syntax or encoding raises ``SourceError``
    naming ``source``, line and column."""
    text = _decode(data, source) if isinstance(data, bytes) else data
    try:
        docs = list(yaml.load_all(text, Loader=FastSafeLoader))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SourceError(f"{source}: {where}: {err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise SourceError(f"{source}: {err}") from err
    return parse_documents(docs, source=source, trust_domain=trust_domain, version=version)


def read_yaml_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SourceError(f"{path}: cannot read: {err.strerror}") from err


def load_yaml_file(path: str | Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                   version: int = 0) -> Snapshot:
    """Read and parse a multi-document YAML file; ``SourceError`` if it is unusable."""
    return parse_yaml(read_yaml_file(path), source=str(path), trust_domain=trust_domain,
                      version=version)
