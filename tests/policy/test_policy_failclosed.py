"""Invalid policies fail closed: what stands in for each, read from the parts that parsed.

Issue #10, finding 6: "one invalid value drops the whole policy", so a DENY
with one bad CIDR next to a good one allowed the source it denies.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_support import ROOT, allow, audit, deny, facts, load, op, policy, rule, src
from test_policy_index import connections, namespaces, policy_strategy

from policy import (
    Action,
    ConnectionFacts,
    Decision,
    Fallback,
    Policy,
    PolicyIndex,
    Reason,
    enforce,
    evaluate,
    load_yaml,
)
from policy.failclosed import stand_in

pytestmark = pytest.mark.unit

stand_ins = st.builds(
    stand_in, namespaces, st.sampled_from(["a", "x"]),
    st.sampled_from([Action.ALLOW, Action.DENY, None]),
    st.one_of(st.none(), st.sampled_from([(("app", "backend"),), (("app", "db"),)])),
    mesh_wide=st.booleans())

BAD_CIDR_DENY = deny("deny-legacy", rule(frm=[src(ipBlocks=["10.0.1.5", "10.0.0.300/8"])]))


def decide_enforced(*docs: object, **connection: Any) -> Decision:
    """The decision of a node that never saw a valid version of any of ``docs``."""
    return evaluate(facts(**connection), PolicyIndex.build(load(*docs).enforced()))


def test_a_deny_with_one_bad_cidr_next_to_a_good_one_denies_that_source() -> None:
    loaded = load(BAD_CIDR_DENY)
    assert [str(e) for e in loaded.errors] == [
        "demo/deny-legacy: rules[0].from[0].source.ipBlocks[1]: '10.0.0.300/8' is not a CIDR"]
    # What the review measured: the policy was dropped, and the source allowed.
    assert evaluate(facts(source_ip="10.0.1.5"), PolicyIndex.build(loaded.policies)).allowed
    assert decide_enforced(BAD_CIDR_DENY, source_ip="10.0.1.5") == Decision(
        False, "demo/deny-legacy", None, Reason.INVALID_POLICY)


def test_a_never_valid_deny_denies_every_connection_to_what_it_selects() -> None:
    selected = deny("d", rule(to=[op(ports=["http"])]), selector={"app": "backend"})
    assert not decide_enforced(selected, source_ip="10.9.9.9", port=9999).allowed
    # Positive control: a workload it does not select is untouched.
    assert decide_enforced(selected, labels={"app": "other"}).reason == Reason.NO_POLICY


def test_a_never_valid_allow_matches_nothing() -> None:
    broken = allow("only-allow", rule(to=[op(ports=["80a"])]), selector={"app": "backend"})
    assert decide_enforced(broken) == Decision(False, "demo/only-allow", None,
                                               Reason.INVALID_POLICY)
    assert decide_enforced(broken, labels={"app": "other"}).allowed
    # Another ALLOW that matches still allows: the broken one only matches nothing.
    good = allow("good", rule(to=[op(ports=["8080"])]))
    assert decide_enforced(broken, good).reason == Reason.ALLOWED_BY_POLICY
    assert decide_enforced(broken, good, port=9090) == Decision(
        False, "demo/only-allow", None, Reason.INVALID_POLICY)


def _with_spec(doc: dict[str, Any], **spec: Any) -> dict[str, Any]:
    doc["spec"].update(spec)
    return doc


BROKEN_RULE = rule(frm=[src(ipBlocks=["nope"])])
SCOPES = [
    # (id, document, stand-in action, selector, mesh-wide)
    ("selector-kept", deny("p", BROKEN_RULE, selector={"app": "backend"}),
     Action.DENY, (("app", "backend"),), False),
    ("allow-kept", allow("p", BROKEN_RULE), Action.ALLOW, None, False),
    ("unknown-action-is-deny", policy("p", rule(), action="DENNY"), Action.DENY, None, False),
    ("unreadable-action-is-deny", policy("p", rule(), action=7), Action.DENY, None, False),  # type: ignore[arg-type]
    ("unreadable-selector-is-namespace", _with_spec(allow("p", rule()), selector={"app": "x"}),
     Action.ALLOW, None, False),
    ("wildcard-selector-is-namespace", deny("p", rule(), selector={"app": "web*"}),
     Action.DENY, None, False),
    ("spec-not-a-mapping", deny("p", rule()) | {"spec": ["x"]}, Action.DENY, None, False),
    ("root-namespace-is-mesh", deny("p", BROKEN_RULE, namespace=ROOT), Action.DENY, None, True),
    ("unreadable-namespace-is-mesh", deny("p", BROKEN_RULE, namespace=5),
     Action.DENY, None, True),
    ("unsupported-version", deny("p", rule(), api_version="security.istio.io/v2"),
     Action.DENY, None, False),
    ("targeted-and-selector", _with_spec(deny("p", rule(), selector={"app": "b"}),
                                         targetRef={"kind": "Gateway", "name": "w"}),
     Action.DENY, (("app", "b"),), False),
]


@pytest.mark.parametrize(("doc", "action", "selector", "mesh_wide"), [c[1:] for c in SCOPES],
                         ids=[c[0] for c in SCOPES])
def test_the_stand_in_is_read_from_the_parts_that_parsed(
        doc: dict[str, Any], action: Action, selector: object, mesh_wide: bool) -> None:
    loaded = load(doc)
    assert loaded.errors and loaded.policies == ()
    (invalid,) = loaded.invalid
    stand_in = invalid.stand_in
    assert stand_in is not None and stand_in.fail_closed
    assert (stand_in.action, stand_in.selector, stand_in.mesh_wide) == (
        action, selector, mesh_wide)
    assert invalid.errors == loaded.errors


def test_a_policy_without_a_name_fails_closed_in_its_namespace() -> None:
    doc = deny("p", BROKEN_RULE)
    del doc["metadata"]["name"]
    (invalid,) = load(doc).invalid
    assert invalid.key == "demo/(unnamed: test document 1)"
    assert invalid.stand_in is not None and not invalid.stand_in.mesh_wide


NOT_HERE = [
    ("custom", _with_spec(policy("p", BROKEN_RULE, action="CUSTOM"), provider={"name": "x"})),
    ("audit", audit("p", BROKEN_RULE)),
    ("targeted", _with_spec(deny("p", BROKEN_RULE), targetRefs=[{"kind": "Gateway",
                                                                 "name": "w"}])),
    ("dry-run", deny("p", BROKEN_RULE) | {"metadata": {
        "name": "p", "namespace": "demo", "annotations": {"istio.io/dry-run": "true"}}}),
]


@pytest.mark.parametrize("doc", [c[1] for c in NOT_HERE], ids=[c[0] for c in NOT_HERE])
def test_no_stand_in_where_the_valid_form_is_not_enforced_here_either(doc: object) -> None:
    loaded = load(doc)
    assert loaded.errors and loaded.enforced() == ()
    assert [p.stand_in for p in loaded.invalid] == [None]


def test_enforce_keeps_the_last_valid_version_and_forgets_deleted_ones() -> None:
    valid = deny("deny-legacy", rule(frm=[src(ipBlocks=["10.0.1.5"])]))
    first = enforce(load(valid, allow("other", rule())))
    assert first.fallbacks == () and set(first.last_valid) == {"demo/deny-legacy", "demo/other"}

    edited = enforce(load(BAD_CIDR_DENY), first.last_valid)
    assert edited.policies == load(valid).policies
    assert [(i.key, f) for i, f in edited.fallbacks] == [("demo/deny-legacy",
                                                          Fallback.LAST_VALID)]
    assert set(edited.last_valid) == {"demo/deny-legacy"}  # "other" was deleted

    deleted = enforce(load(), edited.last_valid)
    assert deleted.policies == () and dict(deleted.last_valid) == {}
    again = enforce(load(BAD_CIDR_DENY), deleted.last_valid)
    assert [f for _, f in again.fallbacks] == [Fallback.FAIL_CLOSED]
    assert again.policies[0].fail_closed


def test_a_valid_version_that_was_not_enforced_stays_not_enforced() -> None:
    targeted = _with_spec(deny("p", rule()), targetRefs=[{"kind": "Gateway", "name": "w"}])
    first = enforce(load(targeted))
    assert first.policies == () and dict(first.last_valid) == {"demo/p": None}
    broken = enforce(load(deny("p", BROKEN_RULE)), first.last_valid)
    assert broken.policies == ()
    assert [f for _, f in broken.fallbacks] == [Fallback.LAST_VALID]


def test_a_later_definition_decides_even_when_it_is_the_invalid_one() -> None:
    valid = deny("deny-legacy", rule(frm=[src(ipBlocks=["10.0.1.5"])]))
    loaded = load(valid, BAD_CIDR_DENY)
    assert loaded.policies == () and [p.key for p in loaded.invalid] == ["demo/deny-legacy"]
    assert [str(w) for w in loaded.warnings][-1].startswith("demo/deny-legacy: defined again")


def _alias_bomb(copies: int) -> str:
    """A valid DENY whose rules repeat one source ``copies**2`` times through YAML aliases."""
    blocks = ", ".join(["10.0.0.1"] * copies)
    sources = ", ".join([f"{{source: &s {{ipBlocks: [{blocks}]}}}}"]
                        + ["{source: *s}"] * (copies - 1))
    rules = ", ".join([f"{{from: &f [{sources}]}}"] + ["{from: *f}"] * (copies - 1))
    return ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: bomb, namespace: demo}\n"
            f"spec: {{action: DENY, selector: {{matchLabels: {{app: backend}}}}, "
            f"rules: [{rules}]}}\n")


def test_a_yaml_alias_bomb_is_bounded_and_fails_closed() -> None:
    """A few KiB that would make the loader read a million values, on the agent's loop."""
    text = _alias_bomb(100)
    assert len(text) < 4096
    loaded = load_yaml(text)
    assert [str(e) for e in loaded.errors] == [
        "demo/bomb: too large: more than 10000 list and mapping entries (counting each time "
        "a YAML alias repeats one)"]
    (invalid,) = loaded.invalid
    assert invalid.stand_in is not None
    assert (invalid.stand_in.action, invalid.stand_in.selector) == (
        Action.DENY, (("app", "backend"),))
    # Positive control: the same shape, small, is a valid policy.
    small = load_yaml(_alias_bomb(3))
    assert small.errors == () and len(small.policies[0].rules) == 3


@given(st.lists(policy_strategy, max_size=8, unique_by=lambda p: p.key), stand_ins, connections)
def test_a_stand_in_never_allows_what_was_denied_without_it(
        policies: list[Policy], extra: Policy, conn: ConnectionFacts) -> None:
    """Whatever else applies, failing closed only ever takes permissions away."""
    base = [p for p in policies if p.key != extra.key]
    decision = evaluate(conn, PolicyIndex.build([*base, extra]))
    assert decision == evaluate(conn, [*base, extra])
    if decision.allowed:
        assert evaluate(conn, PolicyIndex.build(base)).allowed
    if extra.action is Action.DENY and extra.applies_to(conn.dest_namespace, conn.dest_labels):
        assert not decision.allowed
