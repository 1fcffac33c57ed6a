"""AuthorizationPolicy documents → enforceable `Policy` objects, errors, warnings.

Accepted: ``kind: AuthorizationPolicy`` in ``security.istio.io/v1`` or
``v1beta1`` (so existing Istio YAML works unchanged) and in
``security.trellis.dev/v1``; a ``v1 List`` of them (``kubectl get -o yaml``).
Other kinds are ignored. One bad document is reported (every problem, each
naming the policy and field path) and does not stop the others; it is not
enforced as written but replaced by a stand-in that fails closed, built from
the parts of it that could be read (``policy/failclosed.py``; the node keeps
a policy's last valid version instead when it has one). Nothing here raises
for a bad document.

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
from policy.failclosed import InvalidPolicy, stand_in
from policy.model import Action, Policy, Problem, Rule
from policy.schema import MAX_ENTRIES, Reader, TooLarge, child, describe, item

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
    """``policies`` are the valid ones the node proxy enforces; ``set_aside`` the
    keys of valid ones it does not (CUSTOM, targetRef(s), dry-run); ``invalid``
    every policy with errors, with its fail-closed stand-in."""

    policies: tuple[Policy, ...]
    errors: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    invalid: tuple[InvalidPolicy, ...] = ()
    set_aside: frozenset[str] = frozenset()

    def enforced(self) -> tuple[Policy, ...]:
        """What a node that has seen no earlier version of any policy enforces:
        the valid policies and the stand-in of each invalid one."""
        return (*self.policies, *(p.stand_in for p in self.invalid if p.stand_in is not None))


def load_policies(documents: Iterable[Document], *,
                  root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                  default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    """Every policy, valid or not; a later definition of the same namespace/name wins."""
    outcomes: dict[str, Policy | InvalidPolicy | None] = {}
    origins: dict[str, str] = {}
    errors: list[Problem] = []
    warnings: list[Problem] = []
    for document in _expand(documents, errors):
        reader, outcome = _load_one(document, root_namespace, default_namespace)
        errors.extend(reader.errors)
        if not reader.errors:
            warnings.extend(reader.warnings)  # a rejected document's would only add noise
        if outcome is None:
            continue
        key, loaded = outcome
        if key in outcomes:
            warnings.append(Problem(key, "", f"defined again in {document.origin} "
                                    f"(first in {origins[key]}); the later one is used"))
        outcomes[key] = loaded
        origins[key] = document.origin
    return LoadResult(
        policies=tuple(p for p in outcomes.values() if isinstance(p, Policy)),
        errors=tuple(errors), warnings=tuple(warnings),
        invalid=tuple(p for p in outcomes.values() if isinstance(p, InvalidPolicy)),
        set_aside=frozenset(k for k, p in outcomes.items() if p is None))


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


@dataclass(slots=True)
class _Parts:
    """What has been read of one policy, each part read on whatever else is wrong.

    Until a part is read it keeps its widest value, the one a stand-in fails
    closed with: the whole mesh, an action that might be DENY, every workload.
    """

    namespace: str
    name: str
    mesh_wide: bool = True  # the root namespace's, or a namespace not read
    action_name: str | None = None  # None: not read
    selector: tuple[tuple[str, str], ...] | None = None  # None: the whole namespace
    targeted: str | None = None  # "targetRef" or "targetRefs" when set
    dry_run: bool = False
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def action(self) -> Action | None:
        return _action(self.action_name)


def _action(name: str | None) -> Action | None:
    """CUSTOM is checked like a DENY, then set aside; None when it could not be read."""
    if name is None:
        return None
    return Action.DENY if name == "CUSTOM" else Action(name)


Outcome = tuple[str, Policy | InvalidPolicy | None]


def _load_one(document: Document, root_namespace: str,
              default_namespace: str) -> tuple[Reader, Outcome | None]:
    """None for another kind of object; else the key and the policy (None when it
    is valid but not enforced by the node proxy) or, with errors, an InvalidPolicy."""
    body = document.body
    assert isinstance(body, Mapping)
    reader = Reader(document.origin)
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if kind != KIND or not isinstance(api_version, str):
        return reader, None  # another kind of object: not ours to read
    if api_version not in API_VERSIONS:
        if api_version.partition("/")[0] not in _API_GROUPS:
            return reader, None
        # Read on as if it were v1: its parts still say where it fails closed.
        reader.error("apiVersion", f"{api_version!r} is not supported "
                     f"(use one of {', '.join(sorted(API_VERSIONS))})")
    parts = _Parts(default_namespace, f"(unnamed: {document.origin})")
    try:
        _read(reader, body, parts, root_namespace)
    except TooLarge:
        reader.error("", f"too large: more than {MAX_ENTRIES} list and mapping entries "
                     "(counting each time a YAML alias repeats one)")
    if reader.errors:
        return reader, (parts.key, _invalid(reader, parts))
    return reader, (parts.key, _valid(reader, parts))


def _read(reader: Reader, body: Mapping[str, object], parts: _Parts,
          root_namespace: str) -> None:
    metadata = reader.mapping(body.get("metadata"), "metadata", None)
    if metadata is not None:
        _read_metadata(reader, metadata, parts, root_namespace)
    for key in body:
        if key not in _TOP_LEVEL:
            reader.error(str(key), "unknown top-level field")
    # Paths inside spec are relative to it: "rules[0].from[0]...", as users read them.
    raw_spec = body.get("spec")
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        reader.error("spec", f"expected a mapping, got {describe(raw_spec)}")
        return
    _read_spec(reader, reader.mapping(raw_spec, "", _SPEC) or {}, parts)


def _read_metadata(reader: Reader, metadata: Mapping[str, object], parts: _Parts,
                   root_namespace: str) -> None:
    name = reader.string(metadata.get("name"), "metadata.name")
    if metadata.get("name") is None:
        reader.error("metadata.name", "required")
    raw_namespace = metadata.get("namespace")
    namespace = reader.string(raw_namespace, "metadata.namespace")
    if namespace is not None or raw_namespace is None:  # read, or absent: the default
        parts.namespace = namespace or parts.namespace
        parts.mesh_wide = parts.namespace == root_namespace
    if name is not None:  # until then, messages name the document
        parts.name = name
        reader.policy = parts.key
    parts.dry_run = _dry_run(reader, metadata)


def _read_spec(reader: Reader, spec: Mapping[str, object], parts: _Parts) -> None:
    raw_action = spec.get("action")
    action_name = "ALLOW" if raw_action is None else reader.string(raw_action, "action")
    if action_name is not None and action_name not in _ACTIONS:
        reader.error("action", f"{action_name!r} is not one of {', '.join(_ACTIONS)}")
        action_name = None
    parts.action_name = action_name
    if spec.get("provider") is not None and action_name != "CUSTOM":
        reader.error("provider", f"only allowed with action CUSTOM, not {action_name or '?'}")
    errors = len(reader.errors)
    selector = _selector(reader, spec.get("selector"))
    parts.selector = selector if len(reader.errors) == errors else None
    parts.targeted = next((k for k in ("targetRefs", "targetRef") if spec.get(k) is not None),
                          None)
    if parts.targeted and spec.get("selector") is not None:
        reader.error("", "at most one of selector and targetRef(s) can be set")
    # An action that cannot be read is compiled as DENY, the way it fails closed.
    parts.rules = compile_rules(reader, spec.get("rules"), parts.action or Action.DENY,
                                parts.namespace)


def _valid(reader: Reader, parts: _Parts) -> Policy | None:
    """The policy, or None (with a warning) when the node proxy does not enforce it."""
    if parts.action_name == "CUSTOM":
        reader.warnings.clear()
        reader.warn("action", "CUSTOM (external authorization) is not supported by Trellis; "
                    "this policy is not enforced")
        return None
    if parts.targeted:
        reader.warnings.clear()
        reader.warn(parts.targeted, "applies to the waypoints or gateways it targets, not "
                    "at L4 by the node proxy; this policy is not enforced here")
        return None
    if parts.dry_run:
        reader.warnings.clear()
        reader.warn("", f"{_DRY_RUN} policies are not supported; this policy is not enforced")
        return None
    action = parts.action
    assert action is not None  # no errors, so the action was read
    if action is Action.DENY and not parts.rules:
        reader.warn("rules", "a DENY policy without rules never matches "
                    "(use 'rules: [{}]' to deny everything)")
    return Policy(namespace=parts.namespace, name=parts.name, action=action, rules=parts.rules,
                  selector=parts.selector, mesh_wide=parts.mesh_wide)


def _invalid(reader: Reader, parts: _Parts) -> InvalidPolicy:
    """Its stand-in fails closed, unless its valid form would not be enforced here
    either (a CUSTOM, AUDIT, dry-run, or targeted policy without a selector)."""
    errors = tuple(reader.errors)
    if (parts.action_name in ("CUSTOM", "AUDIT") or parts.dry_run
            or (parts.targeted is not None and parts.selector is None)):
        return InvalidPolicy(parts.key, None, errors)
    return InvalidPolicy(parts.key, stand_in(parts.namespace, parts.name, parts.action,
                                             parts.selector, mesh_wide=parts.mesh_wide),
                         errors)


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
