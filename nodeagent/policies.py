"""From the source's raw AuthorizationPolicy documents to the index the proxy enforces.

A bad policy is reported (by name and field path) and does not stop the
others. It is not dropped, which would fail open: the last valid version this
loader has seen of it (same namespace/name) stays in force, and a policy that
was never valid fails closed for the workloads it selects
(``policy/failclosed.py``). That memory lives here, across snapshots, as a
value handed to the pure ``policy.enforce``; a deleted policy is forgotten.

Problems are logged when the set of them changes, not on every snapshot, so
a broken object that stays broken logs once.

Root namespaces, as each API group's owner defines them: a ``security.istio.io``
policy is mesh-wide when it lives in Istio's root namespace
(``istio_root_namespace``, ``istio-system`` unless Istio's meshConfig says
otherwise), as Istio treats it; a ``security.trellis.dev`` policy when it lives
in Trellis's own (``root_namespace``). So a cluster's existing Istio policies
keep their meaning, and neither mesh's root namespace widens the other's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policy import (
    Document,
    Fallback,
    InvalidPolicy,
    LoadResult,
    Policy,
    PolicyIndex,
    Problem,
    enforce,
    load_policies,
)

_log = logging.getLogger("trellis.nodeagent.policy")
PER_POLICY = 10  # error (and warning) lines logged per policy

_FALLBACK_TEXT = {
    Fallback.LAST_VALID: "invalid policy: its last valid version stays in force",
    Fallback.FAIL_CLOSED: "invalid policy, never valid here: failing closed for the workloads "
                          "it selects",
    Fallback.NOT_ENFORCED: "invalid policy: not enforced (its valid form would not be "
                           "enforced by the node proxy either)",
}


ISTIO_GROUP = "security.istio.io/"


@dataclass
class PolicyLoader:
    root_namespace: str
    istio_root_namespace: str = "istio-system"
    _last_valid: Mapping[str, Policy | None] = field(default_factory=dict)
    _reported: frozenset[str] = field(default_factory=frozenset)
    # The latest load's invalid policies and what stands in for each.
    fallbacks: tuple[tuple[InvalidPolicy, Fallback], ...] = ()

    def load(self, documents: tuple[Mapping[str, object], ...], source: str) -> PolicyIndex:
        docs = [Document(body=doc, origin=f"{source} policy {i + 1}")
                for i, doc in enumerate(documents)]
        istio = [d for d in docs if _is_istio(d.body)]
        result = _merged(
            load_policies([d for d in docs if not _is_istio(d.body)],
                          root_namespace=self.root_namespace),
            load_policies(istio, root_namespace=self.istio_root_namespace))
        enforced = enforce(result, self._last_valid)
        self._last_valid = enforced.last_valid
        self.fallbacks = enforced.fallbacks
        problems = {f"error: {p}" for p in _first_of_each(result.errors)} | {
            f"warning: {p}" for p in _first_of_each(result.warnings)}
        for problem in sorted(problems - self._reported):
            level = logging.ERROR if problem.startswith("error") else logging.WARNING
            _log.log(level, problem.split(": ", 1)[1], extra={"fields": {"source": source}})
        fallbacks = {f"{invalid.key} {fallback}" for invalid, fallback in self.fallbacks}
        for invalid, fallback in self.fallbacks:
            if f"{invalid.key} {fallback}" not in self._reported:
                _log_fallback(invalid, fallback, source)
        self._reported = frozenset(problems | fallbacks)
        return PolicyIndex.build(enforced.policies)


def _is_istio(body: object) -> bool:
    api = body.get("apiVersion") if isinstance(body, Mapping) else None
    return isinstance(api, str) and api.startswith(ISTIO_GROUP)


def _merged(ours: LoadResult, istio: LoadResult) -> LoadResult:
    return LoadResult(policies=ours.policies + istio.policies,
                      errors=ours.errors + istio.errors,
                      warnings=ours.warnings + istio.warnings,
                      invalid=ours.invalid + istio.invalid,
                      set_aside=ours.set_aside | istio.set_aside)


def _first_of_each(problems: Iterable[Problem]) -> list[str]:
    """At most PER_POLICY lines per policy, then one that counts the rest: a policy
    repeated through YAML aliases can carry thousands of errors."""
    counts: Counter[str] = Counter()
    lines: list[str] = []
    for problem in problems:
        counts[problem.policy] += 1
        if counts[problem.policy] <= PER_POLICY:
            lines.append(str(problem))
    lines += [f"{policy}: {count - PER_POLICY} more problems not shown"
              for policy, count in counts.items() if count > PER_POLICY]
    return lines


def _log_fallback(invalid: InvalidPolicy, fallback: Fallback, source: str) -> None:
    first = invalid.errors[0] if invalid.errors else None
    _log.error(_FALLBACK_TEXT[fallback], extra={"fields": {
        "policy": invalid.key, "fallback": str(fallback), "source": source,
        "field": first.path if first else None, "error": str(first) if first else None,
        "errors": len(invalid.errors)}})
