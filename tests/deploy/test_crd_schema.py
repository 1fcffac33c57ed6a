"""The AuthorizationPolicy CRD's schema refuses what the agent's loader refuses.

Admission is where an invalid edit should stop (issue #10, finding 6): the
schema checks CIDRs (CEL ``isIP``/``isCIDR``), ports (a pattern), enums,
``when`` keys and values, and keeps ``targetRef(s)`` so they are not pruned
(issue #17). No API server runs here, so this file carries a small validator
for the part of the structural-schema language the CRD uses, and evaluates its
CEL rules with cel-python. Kubernetes's IP library (``isIP``, ``isCIDR``,
``k8s.io/apiserver/pkg/cel/library``) is not part of cel-python: the two
functions are written below from its documented rules (Go ``netip`` parsing,
no zones, no IPv4-mapped IPv6). What this cannot check is the API server's
own estimate of each rule's cost; the bounds it relies on are checked against
our estimate of it instead.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy  # type: ignore[import-untyped]  # cel-python ships no type information
import pytest
import yaml

from policy import Document, load_policies

pytestmark = pytest.mark.unit

CRD = (Path(__file__).resolve().parents[2] / "deploy" / "charts" / "trellis" / "files" / "crds"
       / "authorizationpolicies.security.trellis.dev.yaml")
Schema = dict[str, Any]


def _schema() -> Schema:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


# --- Kubernetes's CEL IP library, as documented ---------------------------------------------

def _is_ip(text: str) -> bool:
    if "%" in text:  # a zone: refused
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped)


def _is_cidr(text: str) -> bool:
    address, slash, bits = text.partition("/")
    # netip.ParsePrefix: decimal prefix length, no sign, no leading zero, no netmask.
    if not slash or not re.fullmatch(r"0|[1-9][0-9]*", bits) or not _is_ip(address):
        return False
    return int(bits) <= ipaddress.ip_address(address).max_prefixlen


_LIMIT = sys.getrecursionlimit()
_CEL = celpy.Environment()
sys.setrecursionlimit(_LIMIT)  # celpy raises it process-wide; the other tests keep theirs
_FUNCTIONS = {"isIP": lambda s: celpy.celtypes.BoolType(_is_ip(str(s))),
              "isCIDR": lambda s: celpy.celtypes.BoolType(_is_cidr(str(s)))}


def _holds(rule: str, value: object) -> bool:
    """A rule's verdict; an evaluation error refuses the object, as the API server does."""
    program = _CEL.program(_CEL.compile(rule), functions=_FUNCTIONS)
    try:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError:
        return False
    if isinstance(result, celpy.CELEvalError):
        return False
    return result is True or (isinstance(result, celpy.celtypes.BoolType) and bool(result))


# --- the structural-schema subset the CRD uses -----------------------------------------------

_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}


def validate(schema: Schema, value: Any, path: str = "") -> list[str]:
    """Every violation, each with its field path (defaults are applied first)."""
    if not isinstance(value, _TYPES[schema["type"]]):
        return [f"{path}: expected {schema['type']}"]
    errors = [f"{path}: {check}" for check in _checks(schema, value)]
    for rule in schema.get("x-kubernetes-validations", []):
        if not _holds(rule["rule"], value):
            errors.append(f"{path}: {rule['message']}")
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        for key, entry in value.items():
            inner = (properties or {}).get(key, schema.get("additionalProperties"))
            if inner is not None:
                errors += validate(inner, entry, f"{path}.{key}")
            elif properties is not None:  # `metadata` has none: the API server checks it
                errors.append(f"{path}.{key}: unknown field")
    if isinstance(value, list):
        for index, entry in enumerate(value):
            errors += validate(schema["items"], entry, f"{path}[{index}]")
    return errors


def _checks(schema: Schema, value: Any) -> Iterator[str]:
    size = len(value) if isinstance(value, str | list | dict) else 0
    if "enum" in schema and value not in schema["enum"]:
        yield f"{value!r} is not one of {schema['enum']}"
    if "pattern" in schema and not re.search(schema["pattern"], value):
        yield f"{value!r} does not match {schema['pattern']}"
    for bound, holds in (("minLength", size >= schema.get("minLength", 0)),
                         ("maxLength", size <= schema.get("maxLength", size)),
                         ("minItems", size >= schema.get("minItems", 0)),
                         ("maxItems", size <= schema.get("maxItems", size)),
                         ("minProperties", size >= schema.get("minProperties", 0)),
                         ("maxProperties", size <= schema.get("maxProperties", size))):
        if not holds:
            yield f"violates {bound}"
    for key in schema.get("required", []):
        if key not in value:
            yield f"{key}: required"


def with_defaults(schema: Schema, value: Any) -> Any:
    if isinstance(value, dict):
        for key, inner in schema.get("properties", {}).items():
            if key not in value and "default" in inner:
                value[key] = inner["default"]
            if key in value:
                value[key] = with_defaults(inner, value[key])
    return value


def prune(schema: Schema, value: Any) -> Any:
    """What the API server stores: fields the schema does not know are dropped."""
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        if properties is None:
            return value
        return {k: prune(properties[k], v) for k, v in value.items() if k in properties}
    if isinstance(value, list) and "items" in schema:
        return [prune(schema["items"], v) for v in value]
    return value


def admit(doc: dict[str, Any]) -> list[str]:
    schema = _schema()
    return validate(schema, with_defaults(schema, copy.deepcopy(doc)))


# --- policies ---------------------------------------------------------------------------------

def policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {"apiVersion": "security.trellis.dev/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "demo"}, "spec": spec}


def loader_errors(doc: dict[str, Any]) -> list[str]:
    return [str(e) for e in load_policies([Document(doc, "test")]).errors]


def source(**fields: Any) -> dict[str, Any]:
    return {"action": "DENY", "rules": [{"from": [{"source": fields}]}]}


def operation(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"to": [{"operation": fields}]}]}


def condition(key: str, *values: str) -> dict[str, Any]:
    return {"action": "DENY", "rules": [{"when": [{"key": key, "values": list(values)}]}]}


VALID = [
    ("allow-principals-ports", {"selector": {"matchLabels": {"app": "backend"}},
                                "rules": [{"from": [{"source": {"principals": ["a/ns/b/*"]}}],
                                           "to": [{"operation": {"ports": ["8080", "0"]}}]}]}),
    ("ip-blocks", source(ipBlocks=["10.0.1.5", "10.0.0.1/8", "2001:db8::/32", "::1"],
                         notIpBlocks=["0.0.0.0/0"])),
    ("ports-edges", operation(ports=["65535", "00080", "1"], notPorts=["65530"])),
    ("service-accounts", source(serviceAccounts=["demo/web", "api"])),
    ("trust-domains", source(trustDomains=["*", "*.example.org", "cluster.local", "corp*"])),
    ("when-l4", {"action": "DENY", "rules": [{"when": [
        {"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.1.2.3"]},
        {"key": "destination.port", "values": ["22", "2379"]},
        {"key": "request.headers[x-debug]", "values": ["1"]}]}]}),
    ("targeted", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                  "name": "waypoint"}], "rules": [{}]}),
    ("custom", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
    ("allow-nothing", {}),
]


@pytest.mark.parametrize("spec", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_the_schema_admits_what_the_loader_accepts(spec: dict[str, Any]) -> None:
    assert loader_errors(policy(spec)) == []
    assert admit(policy(spec)) == []


REFUSED = [
    # (id, spec, the field the schema names)
    ("bad-cidr", source(ipBlocks=["10.0.1.5", "10.0.0.300/8"]), "ipBlocks[1]"),
    ("netmask", source(notIpBlocks=["10.0.0.0/255.0.0.0"]), "notIpBlocks[0]"),
    ("prefix-too-long", source(ipBlocks=["10.0.0.0/33"]), "ipBlocks[0]"),
    ("prefix-leading-zero", source(ipBlocks=["10.0.0.0/08"]), "ipBlocks[0]"),
    ("zone", source(remoteIpBlocks=["fe80::1%eth0"]), "remoteIpBlocks[0]"),
    ("not-an-ip", source(ipBlocks=["backend"]), "ipBlocks[0]"),
    ("port-letters", operation(ports=["80a"]), "ports[0]"),
    ("port-too-big", operation(notPorts=["65536"]), "notPorts[0]"),
    ("port-sign", operation(ports=["+80"]), "ports[0]"),
    ("port-empty", operation(ports=[""]), "ports[0]"),
    ("action", {"action": "allow"}, "spec.action"),
    ("action-typo", {"action": "DENNY"}, "spec.action"),
    ("when-ip", condition("destination.ip", "1.2.3"), "when[0]"),
    ("when-port-name", condition("destination.port", "http"), "when[0]"),
    ("when-port-big", condition("destination.port", "70000"), "when[0]"),
    ("when-unknown-key", condition("source.ips", "1.2.3.4"), "when[0].key"),
    ("when-without-values", {"rules": [{"when": [{"key": "source.ip"}]}]}, "when[0]"),
    ("service-account-wildcard", source(serviceAccounts=["demo/*"]), "serviceAccounts[0]"),
    ("service-account-slashes", source(serviceAccounts=["a/b/c"]), "serviceAccounts[0]"),
    ("service-accounts-with-principals", source(serviceAccounts=["a"], principals=["b"]),
     "source"),
    ("trust-domain-middle-star", source(trustDomains=["a*b"]), "trustDomains[0]"),
    ("empty-from", {"rules": [{"from": []}]}, "from"),
    ("empty-source", {"rules": [{"from": [{"source": {}}]}]}, "source"),
    ("selector-and-target", {"selector": {"matchLabels": {"a": "b"}},
                             "targetRef": {"kind": "Service", "name": "x"}}, "spec"),
    ("provider-without-custom", {"action": "DENY", "provider": {"name": "x"}}, "spec"),
    ("selector-wildcard", {"selector": {"matchLabels": {"app": "web*"}}}, "matchLabels.app"),
    ("unknown-field", source(principal=["x"]), "source.principal"),
]


@pytest.mark.parametrize(("spec", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_the_schema_refuses_what_the_loader_refuses(spec: dict[str, Any], field: str) -> None:
    assert loader_errors(policy(spec)), "the loader should refuse this too"
    errors = admit(policy(spec))
    assert errors and any(field in e for e in errors), errors


def test_target_refs_survive_pruning_so_a_waypoint_policy_stays_off_the_node() -> None:
    """Issue #17: a pruned targetRef turned a waypoint policy into a namespace-wide one."""
    doc = policy({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                "name": "waypoint"}, "action": "ALLOW", "rules": [{}]},
                 name="waypoint")
    stored = prune(_schema(), copy.deepcopy(doc))
    assert stored["spec"]["targetRef"] == doc["spec"]["targetRef"]
    loaded = load_policies([Document(stored, "stored")])
    assert loaded.policies == () and loaded.set_aside == {"demo/waypoint"}
    # Control: without targetRef in the schema, the same object is an ALLOW for all.
    without = copy.deepcopy(_schema())
    del without["properties"]["spec"]["properties"]["targetRef"]
    pruned = load_policies([Document(prune(without, copy.deepcopy(doc)), "pruned")])
    assert [(p.key, p.selector) for p in pruned.policies] == [("demo/waypoint", None)]


# --- CEL rules: well-formed, and within the API server's cost budget -----------------------

PER_EXPRESSION_LIMIT = 10_000_000  # apiextensions' StaticEstimatedCostLimit
CRD_LIMIT = 100_000_000  # StaticEstimatedCRDCostLimit
_STRING_TRAVERSAL = 0.1  # cost per character of isIP/isCIDR and of string scans


def _rules(schema: Schema, cardinality: int = 1,
           path: str = "") -> Iterator[tuple[str, Schema, int, dict[str, str]]]:
    """(path, schema node, how many times its rules can run, rule) for every rule."""
    if schema["type"] == "array":
        assert "maxItems" in schema, f"{path}: an array above a CEL rule needs maxItems"
        cardinality *= schema["maxItems"]
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, schema, cardinality, rule
    for key, inner in schema.get("properties", {}).items():
        yield from _rules(inner, cardinality, f"{path}.{key}")
    if "items" in schema:
        yield from _rules(schema["items"], cardinality, f"{path}[]")


def _cost(node: Schema, rule: str) -> float:
    """Our upper estimate of one evaluation: each string the rule reads, scanned twice."""
    if node["type"] == "string":
        assert "maxLength" in node, "a string read by a CEL rule needs maxLength"
        return 3 + 2 * node["maxLength"] * _STRING_TRAVERSAL * 2
    cost = 10.0
    for key, inner in node.get("properties", {}).items():
        if f"self.{key}" in rule and inner["type"] == "array" and ".all(" in rule:
            assert "maxItems" in inner and "maxLength" in inner["items"], key
            cost += inner["maxItems"] * (3 + 2 * inner["items"]["maxLength"] * _STRING_TRAVERSAL)
    return cost


def test_every_cel_rule_compiles_and_fits_the_cost_budget() -> None:
    found = list(_rules(_schema()))
    assert len(found) >= 8
    total = 0.0
    for path, node, cardinality, rule in found:
        _CEL.compile(rule["rule"])  # raises on a malformed rule
        assert rule.get("message"), f"{path}: a rule needs a message"
        cost = _cost(node, rule["rule"]) * cardinality
        assert cost < PER_EXPRESSION_LIMIT, (path, rule["rule"], cost)
        total += cost
    assert total < CRD_LIMIT
