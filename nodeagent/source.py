"""The interface every workload source implements (the YAML file, the Kubernetes API server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from nodeagent.objects import Snapshot


class WorkloadSource(Protocol):
    """A stream of whole snapshots: the initial one first, then one per change.

    A source never yields a partial or broken view: when its input goes bad it
    logs why and yields nothing, so the agent keeps acting on the last good one.
    """

    node: str

    def snapshots(self) -> AsyncIterator[Snapshot]: ...
