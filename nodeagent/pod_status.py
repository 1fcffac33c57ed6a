"""Which pods count, by their status: finished ones do not, and one IP has one owner.

The API server keeps a pod object after its containers ended (``status.phase``
Succeeded or Failed, e.g. a Job's pod) and while it is being deleted. Its IP may
meanwhile belong to a new pod; if the old object still decided who answers at
that address, a client could be sent to, and expect the identity of, a pod that
no longer runs there. So:

- a finished pod is not part of the mesh at all (not enrolled, not an address,
  not a CA placement);
- a pod being deleted that has no IP left is not either;
- when two pods still claim one IP (the API's view can lag the reuse), the
  owner is chosen from the objects alone, never from the order they came in:
  a Running pod first, then the newer (``metadata.creationTimestamp``), then the
  smaller uid. The other is reported, and the source logs the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from nodeagent.object_fields import FieldError, kind_of
from tunnel.state import Workload

RUNNING = "Running"
FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class PodFacts:
    label: str  # "Pod namespace/name", for reports
    workload: Workload
    phase: str
    created: float  # metadata.creationTimestamp, epoch seconds; 0 when absent
    deleting: bool

    @property
    def gone(self) -> bool:
        """Nothing of it runs, or will: not part of the mesh."""
        return self.phase in FINISHED_PHASES or (self.deleting and not self.workload.ip)

    def rank(self) -> tuple[bool, float]:
        return self.phase == RUNNING, self.created


def timestamp(value: object, path: str) -> float:
    """An RFC 3339 time (API JSON) or a YAML timestamp → epoch seconds; absent → 0."""
    if value is None or value == "":
        return 0.0
    when = value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(path, f"{value!r} is not an RFC 3339 time") from None
    if not isinstance(when, datetime):
        raise FieldError(path, f"expected a time, got {kind_of(value)}")
    try:
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except (OverflowError, ValueError):
        raise FieldError(path, f"{value!r} is out of range") from None


def resolve_shared_ips(pods: Sequence[PodFacts], errors: list[str]) -> list[PodFacts]:
    """One pod per IP (see the module rules), the survivors in input order."""
    by_ip: dict[str, list[PodFacts]] = {}
    for p in pods:
        if p.workload.ip:
            by_ip.setdefault(p.workload.ip, []).append(p)
    losers: set[int] = set()
    for ip, group in by_ip.items():
        if len(group) < 2:
            continue
        ordered = sorted(group, key=lambda p: p.workload.uid)
        ordered.sort(key=PodFacts.rank, reverse=True)  # stable: equal ranks keep uid order
        winner = ordered[0]
        for loser in ordered[1:]:
            losers.add(id(loser))
            errors.append(f"{loser.label}: status.podIP: {ip!r} is already used by "
                          f"{winner.label} (kept: running first, then newest, "
                          "then smallest uid)")
    return [p for p in pods if id(p) not in losers]
