"""Identity-based L4 authorization with Istio's AuthorizationPolicy semantics.

    result = load_yaml(text)                      # policies, errors, warnings, invalid
    index = PolicyIndex.build(result.enforced())  # by namespace; cheap updates
    decision = evaluate(facts, index)             # Istio's DENY → ALLOW order

Imports only ``identity`` and the standard library (and PyYAML for reading).
"""

from policy.evaluate import applicable_policies, evaluate
from policy.facts import ConnectionFacts, Decision, Reason
from policy.failclosed import Enforced, Fallback, InvalidPolicy, enforce
from policy.index import PolicyIndex
from policy.loader import (
    DEFAULT_NAMESPACE,
    DEFAULT_ROOT_NAMESPACE,
    Document,
    LoadResult,
    load_policies,
)
from policy.model import Action, Policy, Problem
from policy.sources import load_yaml, parse_yaml

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_ROOT_NAMESPACE",
    "Action",
    "ConnectionFacts",
    "Decision",
    "Document",
    "Enforced",
    "Fallback",
    "InvalidPolicy",
    "LoadResult",
    "Policy",
    "PolicyIndex",
    "Problem",
    "Reason",
    "applicable_policies",
    "enforce",
    "evaluate",
    "load_policies",
    "load_yaml",
    "parse_yaml",
]
