"""``spec.rules`` → `Rule`s that the node proxy can enforce at L4.

Which fields are L4 is ztunnel's list: from.source principals, namespaces,
serviceAccounts, ipBlocks (and their ``not`` forms); to.operation ports and
notPorts; ``when`` keys source.ip, source.namespace, source.principal,
destination.ip and destination.port. Trellis adds trustDomains/notTrustDomains,
which also come from the peer certificate (istiod drops them for ztunnel).
Everything else (hosts, methods, paths, requestPrincipals, remoteIpBlocks, the
other ``when`` keys) needs HTTP, and fails closed:

- ALLOW: a rule with any HTTP field is dropped, as istiod does for ztunnel
  ("Within an ALLOW policy, rules matching HTTP attributes are omitted. This
  will be more restrictive than requested."). A policy left without rules
  matches nothing, so its workloads are denied what no other policy allows.
- DENY (and AUDIT): the HTTP fields are removed and the rest of the rule still
  applies ("DENY policy with HTTP attributes is enforced without the HTTP
  rules. This will be more restrictive than requested.").

The one place Trellis departs from ztunnel: a source, operation or condition
made *only* of HTTP fields. Istio's API says "For a DENY rule, missing
attributes are treated as matches", and its validation warns that such a rule
"will deny all traffic to TCP ports". ztunnel instead skips the empty match
(``src/rbac.rs``), so the clause never matches and the whole DENY rule is
silently a no-op (istio/istio#61126 now says so in the status). Failing open on
a DENY is the wrong way to fail, so here such an entry matches every
connection: ``to: [{operation: {methods: ["POST"]}}]`` in a DENY denies every
connection that the rule's other parts match.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy import fields as F
from policy.model import Action, Clause, Match, Rule
from policy.schema import Reader, child, describe, item

_ALLOW_DROPPED = ("{subject}not enforceable at L4 (HTTP attribute): rule {index} is dropped "
                  "from this ALLOW policy (fails closed: more restrictive than written)")
_DENY_WIDENED = ("{subject}not enforceable at L4 (HTTP attribute): ignored, the rest of rule "
                 "{index} still applies (fails closed: broader than written)")
_EMPTIED = "has only HTTP attributes, so at L4 it matches every connection"


@dataclass(frozen=True, slots=True)
class _Part:
    """One source, operation or condition, reduced to what L4 can enforce."""

    match: Match
    path: str
    http: tuple[tuple[str, str], ...] = ()  # (field path, subject) of each HTTP field


def compile_rules(reader: Reader, value: object, action: Action, namespace: str,
                  ) -> tuple[Rule, ...]:
    """Every rule that survives at L4, each keeping its index as written."""
    entries = reader.items(value, "rules")
    if entries is None:
        return ()
    rules: list[Rule] = []
    for index, entry in enumerate(entries):
        path = item("rules", index)
        if entry is None:
            reader.error(path, "a rule must not be null (use {} to match everything)")
            continue
        rule = _compile_rule(reader, entry, path, index, action, namespace)
        if rule is not None:
            rules.append(rule)
    if entries and not rules and action is Action.ALLOW:
        reader.warn("rules", "no rule is enforceable at L4, so this ALLOW policy matches "
                    "nothing: its workloads are denied what no other ALLOW policy allows")
    return tuple(rules)


def _compile_rule(reader: Reader, value: object, path: str, index: int, action: Action,
                  namespace: str) -> Rule | None:
    rule = reader.mapping(value, path, F.RULE)
    if rule is None:
        return None
    groups: list[list[_Part]] = []
    sources = _entries(reader, rule.get("from"), child(path, "from"), "source")
    groups.append([_source(reader, v, p, namespace) for v, p in sources])
    operations = _entries(reader, rule.get("to"), child(path, "to"), "operation")
    groups.append([_operation(reader, v, p) for v, p in operations])
    conditions = reader.items(rule.get("when"), child(path, "when"))
    for number, condition in enumerate(conditions or []):
        groups.append([_condition(reader, condition, item(child(path, "when"), number))])

    parts = [part for group in groups for part in group if part.http]
    template = _ALLOW_DROPPED if action is Action.ALLOW else _DENY_WIDENED
    for part in parts:
        for field_path, subject in part.http:
            reader.warn(field_path, template.format(subject=subject, index=index))
        if action is not Action.ALLOW and not part.match.fields:
            reader.warn(part.path, _EMPTIED)
    if parts and action is Action.ALLOW:
        return None
    clauses: tuple[Clause, ...] = tuple(
        tuple(part.match for part in group) for group in groups if group)
    return Rule(index=index, clauses=clauses)


def _entries(reader: Reader, value: object, path: str, inner: str) -> list[tuple[object, str]]:
    """``from``/``to``: each entry's ``source``/``operation``, with its path."""
    entries = reader.items(value, path)
    if entries is None:
        return []
    if not entries:
        # Istio rejects an empty list here; leaving the field out means "any".
        reader.error(path, f"must not be empty (omit {path.rsplit('.', 1)[-1]!r} to match any)")
    result: list[tuple[object, str]] = []
    for number, entry in enumerate(entries):
        entry_path = item(path, number)
        mapping = reader.mapping(entry, entry_path, (inner,))
        if mapping is None:
            continue
        if mapping.get(inner) is None:
            reader.error(child(entry_path, inner), "required")
            continue
        result.append((mapping[inner], child(entry_path, inner)))
    return result


def _present(reader: Reader, value: object, path: str,
             names: frozenset[str]) -> dict[str, tuple[str, ...]] | None:
    """The fields set to a non-empty list; Istio treats ``[]`` as unset."""
    errors = len(reader.errors)
    mapping = reader.mapping(value, path, names)
    if mapping is None:
        return None
    present = {k: reader.strings(v, child(path, k)) for k, v in mapping.items() if k in names}
    present = {k: v for k, v in present.items() if v}
    if not present and len(reader.errors) == errors:
        reader.error(path, "must not be empty")
    return present


def _source(reader: Reader, value: object, path: str, namespace: str) -> _Part:
    present = _present(reader, value, path, F.SOURCE_FIELDS)
    if present is None:
        return _Part(Match(()), path)
    if present.keys() & F.SERVICE_ACCOUNT_FIELDS and present.keys() & F.PRINCIPAL_FIELDS:
        reader.error(path, "serviceAccounts cannot be set with principals or namespaces")
    fields = (F.build_field(reader, path, k, not_k, present, namespace)
              for k, not_k in F.SOURCE_PAIRS)
    for key in F.SOURCE_HTTP:
        if key in present:
            F.check_http_values(reader, child(path, key), key, present[key])
    http = tuple((child(path, k), "") for k in F.SOURCE_HTTP if k in present)
    return _Part(Match(tuple(f for f in fields if f is not None)), path, http)


def _operation(reader: Reader, value: object, path: str) -> _Part:
    present = _present(reader, value, path, F.OPERATION_FIELDS)
    if present is None:
        return _Part(Match(()), path)
    ports = F.build_field(reader, path, "ports", "notPorts", present, "")
    http = tuple((child(path, k), "") for k in F.OPERATION_HTTP if k in present)
    return _Part(Match(() if ports is None else (ports,)), path, http)


def _condition(reader: Reader, value: object, path: str) -> _Part:
    errors = len(reader.errors)
    condition = reader.mapping(value, path, F.CONDITION) or {}
    key = condition.get("key")
    values = reader.strings(condition.get("values"), child(path, "values"))
    not_values = reader.strings(condition.get("notValues"), child(path, "notValues"))
    if not isinstance(key, str) or not key:
        problem = "required" if key is None else f"expected an attribute name, got {describe(key)}"
        reader.error(child(path, "key"), problem)
        return _Part(Match(()), path)
    if not values and not not_values and len(reader.errors) == errors:
        reader.error(path, f"at least one of values or notValues must be set for key {key!r}")
    kind = F.condition_kind(reader, child(path, "key"), key)
    if kind is None:
        return _Part(Match(()), path)
    if kind == F.HTTP_CONDITION:
        F.check_http_condition(reader, path, key, values, not_values)
        return _Part(Match(()), path, ((child(path, "key"), f"{key!r} is "),))
    field = F.build_condition_field(reader, path, kind,
                                    {"values": values, "notValues": not_values})
    return _Part(Match(() if field is None else (field,)), path)
