"""Keeps the node proxy's view of the mesh current: state, policies, certificates.

Whoever runs the proxy feeds it from the workload source with this, whether
that is the agent (one process) or the proxy process itself (``trellis proxy
run``), the way ztunnel follows istiod on its own rather than through the CNI
agent. Enrollment (which pods get listeners and redirection) is the
reconciler's business, not this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from identity.spiffe import Identity
from nodeagent.enroll import enrolled_pods
from nodeagent.objects import Snapshot
from nodeagent.policies import PolicyLoader
from tunnel.proxy import Proxy

_log = logging.getLogger("trellis.nodeagent")


class CertificateTracker(Protocol):
    """The part of identity.rotation.CertificateManager the feed needs."""

    def track(self, identity: Identity) -> None: ...

    def untrack(self, identity: Identity) -> None: ...


@dataclass
class MeshFeed:
    node: str
    proxy: Proxy
    certificates: CertificateTracker
    policies: PolicyLoader
    _tracked: frozenset[Identity] = frozenset()
    _invalid: frozenset[tuple[str, str]] = frozenset()  # label sets of trellis_policy_invalid
    synced: bool = False

    def apply(self, snapshot: Snapshot) -> None:
        self.proxy.update_state(snapshot.state)
        closed = self.proxy.update_policies(self.policies.load(snapshot.policies,
                                                               snapshot.source))
        if closed:
            _log.info("policy update closed live connections", extra={"fields": {
                "closed": closed}})
        self._count_invalid()
        # Fetch certificates only for identities that run here, before their pods
        # are enrolled, and stop renewing those that no longer do.
        wanted = frozenset(w.identity for w in enrolled_pods(snapshot.state, self.node))
        for identity in wanted - self._tracked:
            self.certificates.track(identity)
        for identity in self._tracked - wanted:
            self.certificates.untrack(identity)
        self._tracked = wanted
        self.synced = True

    def _count_invalid(self) -> None:
        """One gauge series per invalid policy; a fixed or deleted one's is removed."""
        gauge = self.proxy.inputs.metrics.invalid_policies
        current = frozenset((invalid.key, str(fallback))
                            for invalid, fallback in self.policies.fallbacks)
        for labels in self._invalid - current:
            gauge.remove(*labels)
        for labels in current - self._invalid:
            gauge.labels(*labels).set(1)
        self._invalid = current
