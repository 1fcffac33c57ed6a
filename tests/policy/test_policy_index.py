"""PolicyIndex: cheap immutable updates, and decisions that read only the policies that apply."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st
from policy_support import ROOT, facts

from policy import Action, ConnectionFacts, Policy, PolicyIndex, evaluate
from policy.facts import peer_of
from policy.matchers import StringPattern
from policy.model import Field, Match, Peer, PortValues, Rule, TextAttribute, TextValues

pytestmark = pytest.mark.unit


def make(namespace: str, name: str, action: Action = Action.ALLOW, *,
         selector: Mapping[str, str] | None = None, source_namespace: str | None = None,
         port: int | None = None) -> Policy:
    """A policy with one rule: from ``source_namespace`` (if set) to ``port`` (if set)."""
    clauses: list[tuple[Match, ...]] = []
    if source_namespace is not None:
        values = TextValues(TextAttribute.NAMESPACE, (StringPattern.parse(source_namespace),))
        clauses.append((Match((Field(values, None),)),))
    if port is not None:
        clauses.append((Match((Field(PortValues(frozenset({port})), None),)),))
    return Policy(namespace, name, action, (Rule(0, tuple(clauses)),),
                  None if selector is None else tuple(sorted(selector.items())),
                  mesh_wide=namespace == ROOT)


def keys(policies: object) -> list[str]:
    assert isinstance(policies, tuple | PolicyIndex)
    return [p.key for p in policies]


def test_applicable_is_root_then_own_namespace_wide_before_selected() -> None:
    index = PolicyIndex.build([
        make("demo", "b"), make("demo", "a", selector={"app": "backend"}),
        make("demo", "c", selector={"app": "db"}), make("prod", "x"),
        make(ROOT, "mesh"), make(ROOT, "mesh-db", selector={"app": "db"})])
    assert keys(index.applicable("demo", {"app": "backend"})) == [
        f"{ROOT}/mesh", "demo/b", "demo/a"]
    assert keys(index.applicable("elsewhere", {"app": "db"})) == [f"{ROOT}/mesh", f"{ROOT}/mesh-db"]
    assert len(index) == 6


def test_updates_return_a_new_index_and_leave_the_old_one_alone() -> None:
    before = PolicyIndex.build([make("demo", "a"), make("prod", "b")])
    added = before.with_policy(make("demo", "c", Action.DENY))
    changed = added.with_policy(make("demo", "a", Action.DENY))
    removed = changed.without_policy("prod", "b")
    assert keys(before) == ["demo/a", "prod/b"]
    assert keys(added) == ["demo/a", "demo/c", "prod/b"]
    changed_a = changed.get("demo", "a")
    assert changed_a is not None and changed_a.action is Action.DENY
    assert keys(removed) == ["demo/a", "demo/c"]
    assert "prod" not in removed.namespaces  # an emptied namespace goes away
    assert removed.without_policy("nowhere", "x") is removed
    # Untouched buckets are shared, not copied.
    assert added.namespaces["prod"] is before.namespaces["prod"]


def test_root_policies_update_in_the_mesh_bucket() -> None:
    index = PolicyIndex.build([make(ROOT, "strict", Action.DENY)])
    index = index.with_policy(make(ROOT, "strict", Action.ALLOW))
    assert [p.action for p in index.mesh.ordered] == [Action.ALLOW]
    assert keys(index.without_policy(ROOT, "strict")) == []


def test_evaluation_reads_only_the_policies_that_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 policies in 1,000 namespaces: a decision touches only the policies that
    apply to the destination (and selector checks only the candidates its labels name)."""
    policies = [make(ROOT, "mesh-deny", Action.DENY, source_namespace="blocked"),
                make(ROOT, "mesh-allow-db", selector={"app": "db"})]
    for n in range(1000):
        ns = f"ns-{n}"
        policies += [make(ns, f"wide-{k}", source_namespace=f"src-{k}") for k in range(5)]
        policies += [make(ns, f"svc-{k}", selector={"app": f"svc-{k}"}, port=8000 + k)
                     for k in range(5)]
    index = PolicyIndex.build(policies)
    assert len(index) == 10_002

    selector_checks: list[str] = []
    match_calls: list[str] = []
    original_selects, original_match = Policy.selects, Policy.first_match

    def counting_selects(self: Policy, labels: Mapping[str, str]) -> bool:
        selector_checks.append(self.key)
        return original_selects(self, labels)

    def counting_match(self: Policy, peer: Peer) -> int | None:
        match_calls.append(self.key)
        return original_match(self, peer)

    monkeypatch.setattr(Policy, "selects", counting_selects)
    monkeypatch.setattr(Policy, "first_match", counting_match)
    # A connection no rule matches, so that every applicable policy is tried.
    decision = evaluate(facts(namespace="ns-7", labels={"app": "svc-3"}, port=9999), index)

    assert decision.reason == "no_allow_match"
    # Only the selector filed under one of the workload's labels is even looked at.
    assert selector_checks == ["ns-7/svc-3"]
    # Applicable: mesh-deny, ns-7's five namespace-wide policies and svc-3; each once.
    assert sorted(match_calls) == sorted(
        [f"{ROOT}/mesh-deny", "ns-7/svc-3", *(f"ns-7/wide-{k}" for k in range(5))])


# Random small meshes: the index must agree with the plain list, and with Istio's order.
namespaces = st.sampled_from(["demo", "prod", ROOT])
policy_strategy = st.builds(
    make, namespaces, st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(list(Action)),
    selector=st.one_of(st.none(), st.sampled_from([{"app": "backend"}, {"app": "db"}])),
    source_namespace=st.one_of(st.none(), st.sampled_from(["demo", "prod", "*", "de*"])),
    port=st.one_of(st.none(), st.sampled_from([80, 8080])))
connections = st.builds(
    facts, principal=st.sampled_from([None, "spiffe://cluster.local/ns/demo/sa/frontend",
                                      "spiffe://cluster.local/ns/prod/sa/x"]),
    namespace=st.sampled_from(["demo", "prod"]),
    labels=st.sampled_from([{}, {"app": "backend"}, {"app": "db"}]),
    port=st.sampled_from([80, 8080]))


def istio_order(policies: list[Policy], conn: ConnectionFacts) -> bool:
    """Istio's four steps, written as plainly as possible."""
    applying = [p for p in policies if p.applies_to(conn.dest_namespace, conn.dest_labels)]
    peer = peer_of(conn)
    if any(p.action is Action.DENY and p.first_match(peer) is not None for p in applying):
        return False
    allows = [p for p in applying if p.action is Action.ALLOW]
    return not allows or any(p.first_match(peer) is not None for p in allows)


@given(st.lists(policy_strategy, max_size=8, unique_by=lambda p: p.key), connections)
def test_index_agrees_with_list_and_with_istio_order(policies: list[Policy],
                                                     conn: ConnectionFacts) -> None:
    decision = evaluate(conn, PolicyIndex.build(policies))
    assert decision == evaluate(conn, policies)
    assert decision.allowed == istio_order(policies, conn)


@given(st.lists(policy_strategy, max_size=8, unique_by=lambda p: p.key), policy_strategy)
def test_adding_then_removing_restores_the_index(policies: list[Policy], extra: Policy) -> None:
    base = [p for p in policies if p.key != extra.key]
    index = PolicyIndex.build(base)
    again = index.with_policy(extra).without_policy(extra.namespace, extra.name)
    assert keys(again) == keys(index)
    assert keys(index.with_policy(extra)) == keys(PolicyIndex.build([*base, extra]))
