"""Which pods this node must redirect, and what changed between two snapshots. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tunnel.state import MeshState, Workload


@dataclass(frozen=True, slots=True)
class EnrollmentChanges:
    added: tuple[Workload, ...] = ()
    removed: tuple[Workload, ...] = ()
    # Same uid, same IP and namespace, something else new (labels, identity…):
    # redirection stays as it is, but the proxy must learn the new workload.
    changed: tuple[Workload, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def enrolled_pods(state: MeshState, node: str) -> tuple[Workload, ...]:
    """Enrolled pods scheduled on ``node`` that have an IP, sorted by uid.

    A pod without an IP yet cannot have rules rendered (they name its address);
    it shows up here, as an addition, once its IP is known.
    """
    pods = (w for w in state.workloads_on(node) if w.enrolled and w.ip)
    return tuple(sorted(pods, key=lambda w: w.uid))


def _network(workload: Workload) -> tuple[str, str]:
    # What the rules and listeners are bound to: change either and they must be redone.
    return workload.ip, workload.netns


def diff(old: Iterable[Workload], new: Iterable[Workload]) -> EnrollmentChanges:
    """Changes from ``old`` to ``new``, keyed by uid, each tuple sorted by uid.

    A pod whose IP or namespace changed appears in both ``removed`` (as it was)
    and ``added`` (as it is), because its redirection must be torn down and
    installed again, in that order.
    """
    before = {w.uid: w for w in old}
    after = {w.uid: w for w in new}
    added: list[Workload] = []
    removed: list[Workload] = []
    changed: list[Workload] = []
    for uid in sorted(before.keys() | after.keys()):
        was, now = before.get(uid), after.get(uid)
        if was is not None and now is not None and _network(was) == _network(now):
            if was != now:
                changed.append(now)
            continue
        if was is not None:
            removed.append(was)
        if now is not None:
            added.append(now)
    return EnrollmentChanges(tuple(added), tuple(removed), tuple(changed))
