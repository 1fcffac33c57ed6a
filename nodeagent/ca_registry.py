"""The CA's answer to "does this identity run on that node?", from a workload source."""

from __future__ import annotations

from identity.spiffe import Identity
from nodeagent.objects import Snapshot
from tunnel.state import MeshState


class SnapshotRegistry:
    """Implements identity.ca.WorkloadRegistry over the latest snapshot of a source."""

    def __init__(self) -> None:
        self._placements: frozenset[tuple[str, Identity]] = frozenset()

    def update(self, snapshot: Snapshot) -> None:
        self._placements = placements(snapshot.state)

    def runs_on(self, node: str, identity: Identity) -> bool:
        return (node, identity) in self._placements


def placements(state: MeshState) -> frozenset[tuple[str, Identity]]:
    """Every (node, identity) pair for which a pod is scheduled. Finished pods
    (Succeeded, Failed) and pods being deleted without an IP are not in the
    snapshot (nodeagent/pod_status.py), so they place nothing: a node cannot get
    the identity of a pod that no longer runs there."""
    return frozenset((w.node, w.identity) for w in state.workloads if w.node)
