"""The loader: each error names the policy and field path; a bad document never stops the rest."""

from __future__ import annotations

from typing import Any

import pytest
from policy_support import ROOT, allow, cond, deny, load, op, policy, rule, src

from policy import Action, load_yaml

pytestmark = pytest.mark.unit

P = "demo/allow-frontend"


def errors_of(*docs: object) -> list[str]:
    return [str(e) for e in load(*docs).errors]


def warnings_of(*docs: object) -> list[str]:
    return [str(w) for w in load(*docs).warnings]


def one_rule(r: Any, action: str = "ALLOW") -> dict[str, Any]:
    return policy("allow-frontend", r, action=action)


ERROR_CASES = [
    # (id, the rule, the one expected error after "demo/allow-frontend: ")
    ("bad-cidr", rule(frm=[src(ipBlocks=["10.0.0.1", "10.0.0.300/8"])]),
     "rules[0].from[0].source.ipBlocks[1]: '10.0.0.300/8' is not a CIDR"),
    ("bad-ip", rule(frm=[src(notIpBlocks=["10.0.0.300"])]),
     "rules[0].from[0].source.notIpBlocks[0]: '10.0.0.300' is not an IP address or CIDR"),
    ("netmask-is-not-a-cidr", rule(frm=[src(ipBlocks=["10.0.0.0/255.0.0.0"])]),
     "rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/255.0.0.0' is not a CIDR"),
    ("prefix-too-long", rule(frm=[src(ipBlocks=["10.0.0.0/33"])]),
     "rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/33' is not a CIDR"),
    ("bad-remote-ip", rule(frm=[src(remoteIpBlocks=["nope"])]),
     "rules[0].from[0].source.remoteIpBlocks[0]: 'nope' is not an IP address or CIDR"),
    ("port-not-digits", rule(to=[op(ports=["80a"])]),
     "rules[0].to[0].operation.ports[0]: '80a' is not a port (a number 0-65535)"),
    ("port-too-big", rule(to=[op(notPorts=["65536"])]),
     "rules[0].to[0].operation.notPorts[0]: '65536' is not a port (a number 0-65535)"),
    ("port-with-sign", rule(to=[op(ports=["+80"])]),
     "rules[0].to[0].operation.ports[0]: '+80' is not a port (a number 0-65535)"),
    ("port-unquoted", rule(to=[op(ports=[8080])]),  # type: ignore[list-item]
     'rules[0].to[0].operation.ports[0]: expected a string, got integer 8080 (quote it: "8080")'),
    ("when-port", rule(when=[cond("destination.port", ["http"])]),
     "rules[0].when[0].values[0]: 'http' is not a port (a number 0-65535)"),
    ("when-ip", rule(when=[cond("destination.ip", not_values=["1.2.3"])]),
     "rules[0].when[0].notValues[0]: '1.2.3' is not an IP address or CIDR"),
    ("unknown-source-field", rule(frm=[src(principal=["x"])]),
     "rules[0].from[0].source.principal: unknown field (did you mean 'principals'?)"),
    ("unknown-operation-field", rule(to=[op(port=["80"])]),
     "rules[0].to[0].operation.port: unknown field (did you mean 'ports'?)"),
    ("unknown-rule-field", {"froms": [src(principals=["a"])]},
     "rules[0].froms: unknown field (did you mean 'from'?)"),
    ("unknown-condition-field", {"when": [{"key": "source.ip", "value": ["1.2.3.4"]}]},
     "rules[0].when[0].value: unknown field (did you mean 'values'?)"),
    ("list-expected", rule(frm=[src(principals="cluster.local/ns/a/sa/b")]),  # type: ignore[arg-type]
     "rules[0].from[0].source.principals: expected a list, got string 'cluster.local/ns/a/sa/b'"),
    ("boolean-namespace", rule(frm=[src(namespaces=[True])]),  # type: ignore[list-item]
     "rules[0].from[0].source.namespaces[0]: expected a string, got boolean true"),
    ("null-value", rule(frm=[src(namespaces=[None])]),  # type: ignore[list-item]
     "rules[0].from[0].source.namespaces[0]: expected a string, got null"),
    ("empty-string", rule(frm=[src(principals=[""])]),
     "rules[0].from[0].source.principals[0]: must not be empty"),
    ("empty-from", {"from": []}, "rules[0].from: must not be empty (omit 'from' to match any)"),
    ("empty-to", {"to": []}, "rules[0].to: must not be empty (omit 'to' to match any)"),
    ("source-missing", {"from": [{}]}, "rules[0].from[0].source: required"),
    ("source-empty", {"from": [{"source": {}}]}, "rules[0].from[0].source: must not be empty"),
    ("operation-empty", {"to": [{"operation": {"ports": []}}]},
     "rules[0].to[0].operation: must not be empty"),
    ("from-entry-not-mapping", {"from": ["x"]},
     "rules[0].from[0]: expected a mapping, got string 'x'"),
    ("service-accounts-with-principals", rule(frm=[src(serviceAccounts=["a"], principals=["b"])]),
     "rules[0].from[0].source: serviceAccounts cannot be set with principals or namespaces"),
    ("service-account-wildcard", rule(frm=[src(serviceAccounts=["demo/*"])]),
     "rules[0].from[0].source.serviceAccounts[0]: 'demo/*': wildcards are not allowed here"),
    ("service-account-format", rule(frm=[src(notServiceAccounts=["a/b/c"])]),
     "rules[0].from[0].source.notServiceAccounts[0]: 'a/b/c' is not "
     "'namespace/serviceAccount' or 'serviceAccount'"),
    ("service-account-empty-ns", rule(frm=[src(serviceAccounts=["/sa"])]),
     "rules[0].from[0].source.serviceAccounts[0]: '/sa' is not "
     "'namespace/serviceAccount' or 'serviceAccount'"),
    ("trust-domain-slash", rule(frm=[src(trustDomains=["a/b"])]),
     "rules[0].from[0].source.trustDomains[0]: 'a/b': a trust domain has no '/'"),
    ("trust-domain-middle-star", rule(frm=[src(trustDomains=["a*b"])]),
     "rules[0].from[0].source.trustDomains[0]: 'a*b': one '*' is allowed, at the start or end"),
    ("when-no-key", {"when": [{"values": ["a"]}]}, "rules[0].when[0].key: required"),
    ("when-no-values", rule(when=[cond("source.ip")]),
     "rules[0].when[0]: at least one of values or notValues must be set for key 'source.ip'"),
    ("when-unknown-attribute", rule(when=[cond("source.ips", ["1.2.3.4"])]),
     "rules[0].when[0].key: unknown attribute 'source.ips'"),
    ("when-bad-map-key", rule(when=[cond("request.headers", ["a"])]),
     "rules[0].when[0].key: bad key 'request.headers': should have the form name[entry]"),
    ("when-destination-labels", rule(when=[cond("destination.labels[app]", ["a"])]),
     "rules[0].when[0].key: 'destination.labels[app]' is replaced by the workload selector"),
    ("when-destination-namespace", rule(when=[cond("destination.namespace", ["a"])]),
     "rules[0].when[0].key: 'destination.namespace' is replaced by metadata.namespace"),
]


@pytest.mark.parametrize(("rule_", "message"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_error_names_policy_and_field_path(rule_: Any, message: str) -> None:
    result = load(one_rule(rule_))
    assert [str(e) for e in result.errors] == [f"{P}: {message}"]
    assert result.policies == ()


SPEC_ERRORS = [
    ("action", {"action": "allow"}, "action: 'allow' is not one of ALLOW, DENY, AUDIT, CUSTOM"),
    ("action-type", {"action": 1}, "action: expected a string, got integer 1"),
    ("rules-type", {"rules": {"from": []}}, "rules: expected a list, got a mapping"),
    ("null-rule", {"rules": [None]},
     "rules[0]: a rule must not be null (use {} to match everything)"),
    ("unknown-spec-field", {"actions": "DENY"}, "actions: unknown field (did you mean 'action'?)"),
    ("label-type", {"selector": {"matchLabels": {"version": 1}}},
     "selector.matchLabels.version: expected a string, got integer 1"),
    ("label-wildcard", {"selector": {"matchLabels": {"app": "web*"}}},
     "selector.matchLabels.app: wildcards are not supported in a selector"),
    ("selector-field", {"selector": {"labels": {"app": "a"}}},
     "selector.labels: unknown field (did you mean 'matchLabels'?)"),
    ("selector-and-target", {"selector": {"matchLabels": {"a": "b"}},
                             "targetRefs": [{"kind": "Service", "name": "x"}]},
     "at most one of selector and targetRef(s) can be set"),
    ("provider-without-custom", {"action": "DENY", "provider": {"name": "x"}, "rules": [{}]},
     "provider: only allowed with action CUSTOM, not DENY"),
]


@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in SPEC_ERRORS],
                         ids=[c[0] for c in SPEC_ERRORS])
def test_spec_errors(spec: dict[str, Any], message: str) -> None:
    doc = policy("allow-frontend", no_rules=True)
    doc["spec"] = spec
    assert errors_of(doc) == [f"{P}: {message}"]


def test_several_errors_in_one_document_are_all_reported() -> None:
    doc = one_rule(rule(frm=[src(ipBlocks=["x/1"])], to=[op(ports=["y"])]))
    assert errors_of(doc) == [
        f"{P}: rules[0].from[0].source.ipBlocks[0]: 'x/1' is not a CIDR",
        f"{P}: rules[0].to[0].operation.ports[0]: 'y' is not a port (a number 0-65535)",
    ]


def test_one_bad_document_leaves_the_others_working() -> None:
    good = allow("good", rule())
    result = load(good, one_rule(rule(frm=[src(ipBlocks=["bad"])])), deny("also-good", rule()))
    assert [p.key for p in result.policies] == ["demo/good", "demo/also-good"]
    assert len(result.errors) == 1


def test_document_level_problems() -> None:
    no_name = policy("x", rule())
    del no_name["metadata"]["name"]
    unknown_top = policy("x", rule()) | {"extra": 1}
    spec_list = policy("y", rule()) | {"spec": []}
    assert errors_of(no_name, unknown_top, spec_list, ["not", "an", "object"]) == [
        "test document 1: metadata.name: required",
        "demo/x: extra: unknown top-level field",
        "demo/y: spec: expected a mapping, got a list",
        "test document 4: expected a Kubernetes object (a mapping), got a list",
    ]


def test_versions_and_groups() -> None:
    docs = [policy("v1", rule()), policy("beta", rule(), api_version="security.istio.io/v1beta1"),
            policy("trellis", rule(), api_version="security.trellis.dev/v1"),
            policy("other-group", rule(), api_version="example.com/v1"),
            policy("alpha", rule(), api_version="security.istio.io/v1alpha1")]
    result = load(*docs)
    assert [p.key for p in result.policies] == ["demo/v1", "demo/beta", "demo/trellis"]
    assert [str(e) for e in result.errors] == [
        "test document 5: apiVersion: 'security.istio.io/v1alpha1' is not supported (use one of "
        "security.istio.io/v1, security.istio.io/v1beta1, security.trellis.dev/v1)"]


def test_other_kinds_are_ignored() -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
                  "data": {"rules": "nonsense"}}
    peer_auth = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                 "metadata": {"name": "x"}, "spec": {"mtls": {"mode": "STRICT"}}}
    result = load(config_map, peer_auth, None)
    assert result == type(result)((), (), ())


def test_a_kubectl_list_is_opened() -> None:
    listing = {"apiVersion": "v1", "kind": "List",
               "items": [allow("a", rule()), "junk", deny("d", rule())]}
    result = load(listing)
    assert [p.key for p in result.policies] == ["demo/a", "demo/d"]
    assert [str(e) for e in result.errors] == [
        "test document 1 items[1]: expected a Kubernetes object (a mapping), got string 'junk'"]


def test_namespace_defaults_and_root_namespace() -> None:
    unnamespaced = allow("a", rule())
    del unnamespaced["metadata"]["namespace"]
    result = load(unnamespaced, allow("r", rule(), namespace=ROOT))
    assert [(p.key, p.mesh_wide) for p in result.policies] == [
        ("default/a", False), (f"{ROOT}/r", True)]
    custom_root = load(allow("r", rule(), namespace="istio-system"), root_namespace="istio-system")
    assert custom_root.policies[0].mesh_wide


def test_selector_and_action_defaults() -> None:
    doc = policy("p", rule(), selector={"version": "v1", "app": "backend"})
    (loaded,) = load(doc, policy("q", rule(), selector={})).policies[:1]
    assert loaded.action is Action.ALLOW
    assert loaded.selector == (("app", "backend"), ("version", "v1"))
    assert load(policy("q", rule(), selector={})).policies[0].selector is None


def test_a_later_definition_wins_with_a_warning() -> None:
    result = load(allow("p", rule()), deny("p", rule()))
    assert [(p.key, p.action) for p in result.policies] == [("demo/p", Action.DENY)]
    assert [str(w) for w in result.warnings] == [
        "demo/p: defined again in test document 2 (first in test document 1); "
        "the later one is used"]


def test_l7_in_allow_drops_the_rule_with_a_warning() -> None:
    doc = allow("p", rule(to=[op(methods=["GET"])], when=[cond("request.headers[x-id]", ["1"])]))
    result = load(doc)
    assert result.policies[0].rules == ()
    assert [str(w) for w in result.warnings] == [
        "demo/p: rules[0].to[0].operation.methods: not enforceable at L4 (HTTP attribute): "
        "rule 0 is dropped from this ALLOW policy (fails closed: more restrictive than written)",
        "demo/p: rules[0].when[0].key: 'request.headers[x-id]' is not enforceable at L4 (HTTP "
        "attribute): rule 0 is dropped from this ALLOW policy (fails closed: more restrictive "
        "than written)",
        "demo/p: rules: no rule is enforceable at L4, so this ALLOW policy matches nothing: its "
        "workloads are denied what no other ALLOW policy allows",
    ]


def test_l7_in_deny_keeps_the_rest_with_a_warning() -> None:
    doc = deny("d", rule(frm=[src(namespaces=["legacy"], requestPrincipals=["*"])],
                         to=[op(paths=["/admin"])]))
    result = load(doc)
    assert [r.index for r in result.policies[0].rules] == [0]
    assert [str(w) for w in result.warnings] == [
        "demo/d: rules[0].from[0].source.requestPrincipals: not enforceable at L4 (HTTP "
        "attribute): ignored, the rest of rule 0 still applies (fails closed: broader than "
        "written)",
        "demo/d: rules[0].to[0].operation.paths: not enforceable at L4 (HTTP attribute): "
        "ignored, the rest of rule 0 still applies (fails closed: broader than written)",
        "demo/d: rules[0].to[0].operation: has only HTTP attributes, so at L4 it matches "
        "every connection",
    ]


def test_unsupported_policies_are_reported_and_not_enforced() -> None:
    custom = policy("ext", rule(), action="CUSTOM")
    custom["spec"]["provider"] = {"name": "opa"}
    targeted = deny("waypoint", rule())
    targeted["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                      "name": "waypoint"}]
    dry = deny("dry", rule())
    dry["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    result = load(custom, targeted, dry)
    assert result.policies == () and result.errors == ()
    assert [str(w) for w in result.warnings] == [
        "demo/ext: action: CUSTOM (external authorization) is not supported by Trellis; "
        "this policy is not enforced",
        "demo/waypoint: targetRefs: applies to the waypoints or gateways it targets, not at L4 "
        "by the node proxy; this policy is not enforced here",
        "demo/dry: istio.io/dry-run policies are not supported; this policy is not enforced",
    ]


def test_deny_without_rules_warns() -> None:
    assert warnings_of(deny("d")) == [
        "demo/d: rules: a DENY policy without rules never matches "
        "(use 'rules: [{}]' to deny everything)"]


def test_yaml_text_and_syntax_errors() -> None:
    text = """
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: demo
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/frontend"]
---
kind: [unclosed
"""
    result = load_yaml([("policies.yaml", text)])
    assert [p.key for p in result.policies] == [P]
    assert [str(e) for e in result.errors] == [
        "policies.yaml: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "at line 14, column 1"]


def test_yaml_nested_too_deeply_is_an_error_not_a_crash() -> None:
    """Found by tests/fuzz/fuzz_policy_loader.py (corpus: deep_nesting.yaml): 3,000
    brackets raised RecursionError out of load_yaml, after ~2 s in PyYAML's scanner
    (quadratic in flow nesting); now refused before parsing, at once."""
    result = load_yaml([("deep.yaml", "kind: List\n---\nrules: " + "[" * 3000)])
    assert [str(e) for e in result.errors] == [
        "deep.yaml: invalid YAML: brackets nested more than 64 deep at line 3"]
    at_the_limit = "rules: " + "[" * 64 + "]" * 64
    assert load_yaml(at_the_limit).errors == ()  # positive control


def test_yaml_nested_too_deeply_in_block_style_is_an_error() -> None:
    """Block style nests without brackets ("- - - a" is [[[a]]]); PyYAML's recursion
    still ends in an error, whatever recursion limit the test run has set."""
    text = "- " * 50_000 + "a"
    assert [str(e) for e in load_yaml([("deep.yaml", text)]).errors] == [
        "deep.yaml: invalid YAML: nested too deeply"]


@pytest.mark.parametrize(("text", "names"), [
    ("spec: {action: !!bool maybe}", "'maybe' is not a valid !!bool"),
    ("metadata:\n  creationTimestamp: 2024-02-30\n", "'2024-02-30' is not a valid !!timestamp"),
    ("spec: {action: !!int }", "is not a valid !!int"),
    ("apiVersion: security.istio.io/v1\nkind: !!int AuthorizationPolicy\n",
     "'AuthorizationPolicy' is not a valid !!int"),
], ids=["bool-tag", "date-out-of-range", "empty-int-tag", "int-tag"])
def test_a_value_yaml_cannot_construct_is_an_error_naming_it_not_a_crash(
        text: str, names: str) -> None:
    """PyYAML's constructors raised ValueError, KeyError or IndexError out of load_yaml
    for these (found by review after tests/fuzz/fuzz_k8s_objects.py hit the same in
    the workload reader; corpus: tagged_*.yaml)."""
    errors = [str(e) for e in load_yaml([("bad.yaml", text)]).errors]
    assert len(errors) == 1 and errors[0].startswith("bad.yaml: invalid YAML: ")
    assert names in errors[0] and "line " in errors[0]
    assert load_yaml("spec: {action: DENY}").errors == ()  # positive control
