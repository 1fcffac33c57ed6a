"""AuthorizationPolicy documents → enforceable `Policy` objects, errors, warnings.

Accepted: ``kind: AuthorizationPolicy`` in ``security.istio.io/v1`` or
``v1beta1`` (so existing Istio YAML works unchanged) and in
``security.trellis.dev/v1``; a ``v1 List`` of them (``kubectl get -o yaml``).
Other kinds are ignored. One bad document is reported (every problem, each
naming the policy and field path) and left out; the others load. Nothing here
raises for a bad document.

Not enforced, with a warning, as the node proxy cannot or must not:
``action: CUSTOM`` (external authorization; istiod sends ztunnel nothing for
it), policies attached with ``targetRef(s)`` (those are for waypoints and
gateways, which istiod also keeps from ztunnel), and ``istio.io/dry-run``
policies (istiod refuses them for ztunnel unless a feature flag is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from policy.compile import compile_rules
from policy.model import Action, Policy, Problem
from policy.schema import Reader, child, describe, item

DEFAULT_ROOT_NAMESPACE = "trellis-system"
DEFAULT_NAMESPACE = "default"  # as kubectl applies a document without one

KIND = "AuthorizationPolicy"
API_VERSIONS = frozenset(("security.istio.io/v1", "security.istio.io/v1beta1",
                          "security.trellis.dev/v1"))
_API_GROUPS = frozenset(v.partition("/")[0] for v in API_VERSIONS)
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")
_SPEC = ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
_DRY_RUN = "istio.io/dry-run"
_TRUE = frozenset(("1", "t", "T", "TRUE", "true", "True"))  # Go's strconv.ParseBool


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed YAML/JSON document and where it came from (for messages)."""

    body: object
    origin: str  # e.g. "policies.yaml document 2"


@dataclass(frozen=True, slots=True)
class LoadResult:
    policies: tuple[Policy, ...]
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


def load_policies(documents: Iterable[Document], *,
                  root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                  default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    """Every valid policy; a later definition of the same namespace/name wins."""
    policies: dict[str, Policy] = {}
    origins: dict[str, str] = {}
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for document in _expand(documents, errors):
        reader, policy = _load_one(document, root_namespace, default_namespace)
        errors.extend(reader.errors)
        if reader.errors:
            continue  # a rejected document's warnings would only add noise
        warnings.extend(reader.warnings)
        if policy is None:
            continue
        if policy.key in policies:
            warnings.append(Problem(policy.key, "", f"defined again in {document.origin} "
                                    f"(first in {origins[policy.key]}); the later one is used"))
        policies[policy.key] = policy
        origins[policy.key] = document.origin
    return LoadResult(tuple(policies.values()), tuple(errors), tuple(warnings))


def _expand(documents: Iterable[Document], errors: list[Problem]) -> Iterator[Document]:
    """Objects worth reading: skips empty documents, opens a ``v1 List``."""
    for document in documents:
        body = document.body
        if isinstance(body, Mapping) and body.get("kind") == "List" \
                and body.get("apiVersion") == "v1":
            entries = body.get("items")
            inner = [Document(entry, f"{document.origin} {item('items', index)}")
                     for index, entry in enumerate(entries if isinstance(entries, list) else [])]
        else:
            inner = [document]
        for one in inner:
            if isinstance(one.body, Mapping):
                yield one
            elif one.body is not None:
                errors.append(Problem(one.origin, "", f"expected a Kubernetes object "
                                      f"(a mapping), got {describe(one.body)}"))


def _load_one(document: Document, root_namespace: str,
              default_namespace: str) -> tuple[Reader, Policy | None]:
    body = document.body
    assert isinstance(body, Mapping)
    reader = Reader(document.origin)
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if kind != KIND or not isinstance(api_version, str):
        return reader, None  # another kind of object: not ours to read
    if api_version not in API_VERSIONS:
        if api_version.partition("/")[0] in _API_GROUPS:
            reader.error("apiVersion", f"{api_version!r} is not supported "
                         f"(use one of {', '.join(sorted(API_VERSIONS))})")
        return reader, None
    metadata = reader.mapping(body.get("metadata"), "metadata", None) or {}
    name = reader.string(metadata.get("name"), "metadata.name")
    namespace = reader.string(metadata.get("namespace"), "metadata.namespace")
    if name is None:
        if "name" not in metadata:
            reader.error("metadata.name", "required")
        return reader, None
    namespace = namespace or default_namespace
    reader.policy = f"{namespace}/{name}"
    for key in body:
        if key not in _TOP_LEVEL:
            reader.error(str(key), "unknown top-level field")
    # Paths inside spec are relative to it: "rules[0].from[0]...", as users read them.
    if body.get("spec") is not None and not isinstance(body.get("spec"), Mapping):
        reader.error("spec", f"expected a mapping, got {describe(body.get('spec'))}")
        return reader, None
    spec = reader.mapping(body.get("spec"), "", _SPEC)
    if spec is None:
        return reader, None
    return reader, _load_spec(reader, spec, metadata, namespace, name, root_namespace)


def _load_spec(reader: Reader, spec: Mapping[str, object], metadata: Mapping[str, object],
               namespace: str, name: str, root_namespace: str) -> Policy | None:
    action_name = reader.string(spec.get("action"), "action") or "ALLOW"
    if action_name not in _ACTIONS:
        reader.error("action", f"{action_name!r} is not one of {', '.join(_ACTIONS)}")
        return None
    if spec.get("provider") is not None and action_name != "CUSTOM":
        reader.error("provider", f"only allowed with action CUSTOM, not {action_name}")
    selector = _selector(reader, spec.get("selector"))
    targeted = next((k for k in ("targetRefs", "targetRef") if spec.get(k) is not None), None)
    if targeted and spec.get("selector") is not None:
        reader.error("", "at most one of selector and targetRef(s) can be set")
    # CUSTOM is checked like any other action, then reported and set aside.
    action = Action.DENY if action_name == "CUSTOM" else Action(action_name)
    rules = compile_rules(reader, spec.get("rules"), action, namespace)
    if reader.errors:
        return None
    if action_name == "CUSTOM":
        reader.warnings.clear()
        reader.warn("action", "CUSTOM (external authorization) is not supported by Trellis; "
                    "this policy is not enforced")
        return None
    if targeted:
        reader.warnings.clear()
        reader.warn(targeted, "applies to the waypoints or gateways it targets, not "
                    "at L4 by the node proxy; this policy is not enforced here")
        return None
    if _dry_run(reader, metadata):
        reader.warnings.clear()
        reader.warn("", f"{_DRY_RUN} policies are not supported; this policy is not enforced")
        return None
    if action is Action.DENY and not spec.get("rules"):
        reader.warn("rules", "a DENY policy without rules never matches "
                    "(use 'rules: [{}]' to deny everything)")
    return Policy(namespace=namespace, name=name, action=action, rules=rules,
                  selector=selector, mesh_wide=namespace == root_namespace)


def _selector(reader: Reader, value: object) -> tuple[tuple[str, str], ...] | None:
    """``matchLabels`` as sorted pairs; None (whole namespace) when empty.

    An empty selector selects every workload, the same as no selector.
    """
    selector = reader.mapping(value, "selector", ("matchLabels",))
    if not selector:
        return None
    path = child("selector", "matchLabels")
    labels = reader.string_map(selector.get("matchLabels"), path)
    for key, entry in labels.items():
        if not key:
            reader.error(path, "a label name must not be empty")
        elif "*" in key or "*" in entry:
            reader.error(child(path, key), "wildcards are not supported in a selector")
    return tuple(sorted(labels.items())) or None


def _dry_run(reader: Reader, metadata: Mapping[str, object]) -> bool:
    annotations = reader.mapping(metadata.get("annotations"), "metadata.annotations", None)
    value = (annotations or {}).get(_DRY_RUN)
    return isinstance(value, str) and value in _TRUE
