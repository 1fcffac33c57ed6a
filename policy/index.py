"""Policies by namespace, so a decision reads only the policies that can apply.

Istio's scope rules decide the layout: "If set to root namespace, the policy
applies to all namespaces in a mesh", and a selector "will match with
workloads in the same namespace as the authorization policy. If the
authorization policy is in the root namespace, the selector will additionally
match with workloads in all namespaces." So the policies for a workload are
among the root namespace's and its own namespace's, and only those two
buckets are read. Within them a decision touches the namespace-wide policies
and the selector policies filed under one of the workload's own labels: its
cost grows with the policies that can apply to the destination, never with
the mesh's total.

The index is immutable. An update returns a new index that shares every
bucket but the one it touched (copying the namespace → bucket map, not the
policies), so a reader holding the old index is never disturbed and swapping
in the new one is a single assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from policy.model import Policy


@dataclass(frozen=True, slots=True)
class _Bucket:
    """One namespace's policies (or the root namespace's).

    Selector policies are filed under one of their labels (the first in
    order), so finding a workload's policies looks up its own labels and
    checks only the policies filed under them, never every selector in the
    namespace.
    """

    by_key: Mapping[str, Policy]  # "namespace/name" → policy
    ordered: tuple[Policy, ...]  # all of them, in name order
    wide: tuple[Policy, ...]  # no selector: they apply to every workload
    by_label: Mapping[tuple[str, str], tuple[Policy, ...]]

    @classmethod
    def of(cls, by_key: Mapping[str, Policy]) -> _Bucket:
        ordered = tuple(by_key[key] for key in sorted(by_key))
        by_label: dict[tuple[str, str], tuple[Policy, ...]] = {}
        for policy in ordered:
            if policy.selector is not None:
                anchor = policy.selector[0]
                by_label[anchor] = (*by_label.get(anchor, ()), policy)
        wide = tuple(p for p in ordered if p.selector is None)
        return cls(by_key, ordered, wide, by_label)

    def without(self, key: str) -> _Bucket:
        return _Bucket.of({k: p for k, p in self.by_key.items() if k != key})

    def applicable(self, labels: Mapping[str, str]) -> tuple[Policy, ...]:
        """Namespace-wide policies, then the selected ones; each in name order."""
        if not self.by_label:
            return self.wide
        selected = [policy for pair in labels.items() for policy in self.by_label.get(pair, ())
                    if policy.selects(labels)]
        if not selected:
            return self.wide
        if len(selected) > 1:
            selected.sort(key=_key)
        return (*self.wide, *selected)


def _key(policy: Policy) -> str:
    return policy.key


_EMPTY = _Bucket({}, (), (), {})


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    """Every enforceable policy in the mesh, bucketed by namespace."""

    mesh: _Bucket = _EMPTY  # root-namespace policies: they apply everywhere
    namespaces: Mapping[str, _Bucket] = field(default_factory=dict)

    @classmethod
    def build(cls, policies: Iterable[Policy]) -> PolicyIndex:
        mesh: dict[str, Policy] = {}
        grouped: dict[str, dict[str, Policy]] = {}
        for policy in policies:
            target = mesh if policy.mesh_wide else grouped.setdefault(policy.namespace, {})
            target[policy.key] = policy
        return cls(_Bucket.of(mesh),
                   {ns: _Bucket.of(by_key) for ns, by_key in grouped.items()})

    def replace_all(self, policies: Iterable[Policy]) -> PolicyIndex:
        return PolicyIndex.build(policies)

    def with_policy(self, policy: Policy) -> PolicyIndex:
        """Adds the policy, or replaces the one with its namespace and name."""
        index = self.without_policy(policy.namespace, policy.name)
        if policy.mesh_wide:
            mesh = _Bucket.of({**index.mesh.by_key, policy.key: policy})
            return PolicyIndex(mesh, index.namespaces)
        bucket = index.namespaces.get(policy.namespace, _EMPTY)
        namespaces = dict(index.namespaces)
        namespaces[policy.namespace] = _Bucket.of({**bucket.by_key, policy.key: policy})
        return PolicyIndex(index.mesh, namespaces)

    def without_policy(self, namespace: str, name: str) -> PolicyIndex:
        """Removes the policy ``namespace/name``; the same index if there is none."""
        key = f"{namespace}/{name}"
        if key in self.mesh.by_key:
            return PolicyIndex(self.mesh.without(key), self.namespaces)
        bucket = self.namespaces.get(namespace)
        if bucket is None or key not in bucket.by_key:
            return self
        namespaces = dict(self.namespaces)
        rest = bucket.without(key)
        if rest.ordered:
            namespaces[namespace] = rest
        else:
            del namespaces[namespace]
        return PolicyIndex(self.mesh, namespaces)

    def applicable(self, namespace: str, labels: Mapping[str, str]) -> tuple[Policy, ...]:
        """The policies for a workload: the root namespace's first, then its own
        namespace's; within each, namespace-wide before selected, by name."""
        mesh = self.mesh.applicable(labels)
        bucket = self.namespaces.get(namespace)
        if bucket is None:
            return mesh
        own = bucket.applicable(labels)
        return mesh + own if mesh else own

    def get(self, namespace: str, name: str) -> Policy | None:
        key = f"{namespace}/{name}"
        bucket = self.namespaces.get(namespace, _EMPTY)
        return self.mesh.by_key.get(key) or bucket.by_key.get(key)

    def __iter__(self) -> Iterator[Policy]:
        yield from self.mesh.ordered
        for namespace in sorted(self.namespaces):
            yield from self.namespaces[namespace].ordered

    def __len__(self) -> int:
        return len(self.mesh.by_key) + sum(len(b.by_key) for b in self.namespaces.values())
