"""What is enforced in place of a policy that fails validation.

On a cluster, admission refuses an invalid edit: the old version of the policy
stays in force and the user sees the error. A node can still be handed an
invalid object (a cluster without Trellis's CRD validation, a workload file
written by hand), and leaving it out would fail open: a DENY would vanish, and
an ALLOW that was the only one would leave everything allowed. So, per policy
(``namespace/name``):

- its last valid version, if this node has seen one, stays in force
  (`Fallback.LAST_VALID`);
- otherwise a stand-in fails closed for the workloads it selects, read from
  the parts that did parse (`Fallback.FAIL_CLOSED`): an ALLOW matches nothing,
  a DENY (or an action that cannot be read) denies every connection. A
  selector that cannot be read widens it to the whole namespace, a namespace
  that cannot be read to the whole mesh, as does a policy in the root
  namespace;
- a policy whose valid form the node proxy would not enforce either (CUSTOM,
  ``targetRef(s)`` without a selector, ``istio.io/dry-run``, AUDIT) stays
  unenforced (`Fallback.NOT_ENFORCED`).

Pure: the memory of last valid versions is a value that the caller keeps
(``nodeagent/policies.py``) and hands back on the next load.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from policy.model import Action, Policy, Problem, Rule

if TYPE_CHECKING:
    from policy.loader import LoadResult


class Fallback(enum.StrEnum):
    """What stands in for an invalid policy; also a metric label value."""

    LAST_VALID = "last_valid"
    FAIL_CLOSED = "fail_closed"
    NOT_ENFORCED = "not_enforced"


@dataclass(frozen=True, slots=True)
class InvalidPolicy:
    """A policy document with errors: its key, its errors, and its stand-in.

    ``stand_in`` is None when the policy would not be enforced by the node
    proxy even if it were valid.
    """

    key: str
    stand_in: Policy | None
    errors: tuple[Problem, ...]


# A rule without clauses matches every connection.
_EVERYTHING = Rule(index=0, clauses=())


def stand_in(namespace: str, name: str, action: Action | None,
             selector: tuple[tuple[str, str], ...] | None, *, mesh_wide: bool) -> Policy:
    """The fail-closed policy for what could be read of an invalid one.

    ``action`` None means it could not be read: the policy might have been a
    DENY, so it is treated as one.
    """
    if action is Action.ALLOW:
        return Policy(namespace, name, Action.ALLOW, (), selector, mesh_wide, fail_closed=True)
    return Policy(namespace, name, Action.DENY, (_EVERYTHING,), selector, mesh_wide,
                  fail_closed=True)


@dataclass(frozen=True, slots=True)
class Enforced:
    """The policies to enforce after one load, and what stood in for each invalid one."""

    policies: tuple[Policy, ...]
    fallbacks: tuple[tuple[InvalidPolicy, Fallback], ...]
    # Key → its last valid version (None: valid, but not enforced by the node),
    # for every policy present in the load: a deleted policy is forgotten.
    last_valid: Mapping[str, Policy | None]


_NOTHING: Mapping[str, Policy | None] = MappingProxyType({})


def enforce(result: LoadResult, last_valid: Mapping[str, Policy | None] = _NOTHING) -> Enforced:
    """Valid policies as loaded; each invalid one replaced as the module says."""
    remembered: dict[str, Policy | None] = {}
    policies: list[Policy] = []
    fallbacks: list[tuple[InvalidPolicy, Fallback]] = []
    for invalid in result.invalid:
        if invalid.key in last_valid:
            previous = last_valid[invalid.key]
            remembered[invalid.key] = previous
            if previous is not None:
                policies.append(previous)
            fallbacks.append((invalid, Fallback.LAST_VALID))
        elif invalid.stand_in is not None:
            policies.append(invalid.stand_in)
            fallbacks.append((invalid, Fallback.FAIL_CLOSED))
        else:
            fallbacks.append((invalid, Fallback.NOT_ENFORCED))
    for policy in result.policies:
        remembered[policy.key] = policy
        policies.append(policy)
    for key in result.set_aside:
        remembered[key] = None
    return Enforced(tuple(policies), tuple(fallbacks), MappingProxyType(remembered))
