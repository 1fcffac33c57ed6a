"""``evaluate(facts, policies) -> Decision``: Istio's order, nothing else.

Istio: "1. If there are any CUSTOM policies that match the request, evaluate
and deny the request if the evaluation result is deny. 2. If there are any
DENY policies that match the request, deny the request. 3. If there are no
ALLOW policies for the workload, allow the request. 4. If any of the ALLOW
policies match the request, allow the request. 5. Deny the request."

CUSTOM never reaches here (the loader sets it aside). "AUDIT policies do not
affect whether requests are allowed or denied": every AUDIT policy that
matches is named in the decision, whatever the decision is.

Policies are tried root namespace first, then the workload's own; within
each, namespace-wide policies before selected ones, each in name order. That
only decides which policy a decision names, never whether the connection is
allowed.

A policy that has never been valid is enforced by a fail-closed stand-in
(``policy/failclosed.py``) that takes part in this order like any other: the
stand-in of a DENY matches every connection, that of an ALLOW matches none.
Only the decision's reason differs, ``invalid_policy``, so that a denial
names the broken policy rather than a rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from policy.facts import ConnectionFacts, Decision, Reason, peer_of
from policy.index import PolicyIndex
from policy.model import Action, Policy

_ALLOWED_WITHOUT_POLICY = Decision(allowed=True, policy=None, rule=None, reason=Reason.NO_POLICY)


def evaluate(facts: ConnectionFacts, policies: PolicyIndex | Iterable[Policy]) -> Decision:
    """Decide one connection. Raises ValueError if an IP in ``facts`` is malformed."""
    if isinstance(policies, PolicyIndex):
        applicable = policies.applicable(facts.dest_namespace, facts.dest_labels)
    else:
        applicable = applicable_policies(policies, facts.dest_namespace, facts.dest_labels)
    if not applicable:
        return _ALLOWED_WITHOUT_POLICY
    peer = peer_of(facts)
    audit = tuple(p.key for p in applicable
                  if p.action is Action.AUDIT and p.first_match(peer) is not None)
    allow: list[Policy] = []
    for policy in applicable:
        if policy.action is Action.DENY:
            rule = policy.first_match(peer)
            if rule is not None and policy.fail_closed:
                return Decision(False, policy.key, None, Reason.INVALID_POLICY, audit)
            if rule is not None:
                return Decision(False, policy.key, rule, Reason.DENIED_BY_POLICY, audit)
        elif policy.action is Action.ALLOW:
            allow.append(policy)
    if not allow:
        return Decision(True, None, None, Reason.NO_POLICY, audit)
    for policy in allow:
        rule = policy.first_match(peer)
        if rule is not None:
            return Decision(True, policy.key, rule, Reason.ALLOWED_BY_POLICY, audit)
    invalid = next((p for p in allow if p.fail_closed), None)
    if invalid is not None:
        return Decision(False, invalid.key, None, Reason.INVALID_POLICY, audit)
    return Decision(False, None, None, Reason.NO_ALLOW_MATCH, audit)


def applicable_policies(policies: Iterable[Policy], namespace: str,
                        labels: Mapping[str, str]) -> tuple[Policy, ...]:
    """The policies that apply to a workload, in the order `PolicyIndex` gives."""
    found = (p for p in policies if p.applies_to(namespace, labels))
    # By key, as the index files them: a mesh-wide stand-in for a policy whose
    # namespace could not be read sits beside the root namespace's policies.
    return tuple(sorted(found, key=lambda p: (not p.mesh_wide, p.selector is not None, p.key)))
