"""Shared values for the identity tests: a fixed clock, two identities, a fake registry.

Imported as a top-level module (pytest puts this directory on sys.path); the
name is prefixed so it cannot collide with another test directory's helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from identity.spiffe import Identity

# Whole seconds: X.509 times have second precision, so comparisons stay exact.
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
BACKEND = Identity.of("demo", "backend")
FRONTEND = Identity.of("demo", "frontend")


@dataclass(frozen=True)
class StaticRegistry:
    """`WorkloadRegistry` from a fixed set of (node, identity) placements."""

    placements: frozenset[tuple[str, Identity]]

    def runs_on(self, node: str, identity: Identity) -> bool:
        return (node, identity) in self.placements
