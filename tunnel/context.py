"""The one bundle of dependencies every listener and handler receives."""

from __future__ import annotations

from dataclasses import dataclass

from policy import PolicyIndex
from tunnel.balancer import RoundRobin
from tunnel.config import ProxyConfig
from tunnel.identities import TlsIdentities
from tunnel.metrics import ProxyMetrics
from tunnel.pool import HboneConnectionPool
from tunnel.state import MeshState


class StateView:
    """The latest ``MeshState`` and ``PolicyIndex``; the agent swaps each whole.

    Both are immutable, so a handler that reads them once works on one
    consistent version even if an update lands while it awaits.
    """

    def __init__(self, state: MeshState | None = None,
                 policies: PolicyIndex | None = None) -> None:
        self.current = state or MeshState()
        self.policies = policies or PolicyIndex.build(())

    def replace(self, state: MeshState) -> None:
        self.current = state

    def replace_policies(self, policies: PolicyIndex) -> None:
        self.policies = policies


@dataclass(frozen=True, slots=True)
class ProxyInputs:
    config: ProxyConfig
    state: StateView
    tls: TlsIdentities
    pool: HboneConnectionPool
    metrics: ProxyMetrics
    balancer: RoundRobin
