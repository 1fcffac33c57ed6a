"""The proxy's feed: state and policies handed over, certificates for this node's identities."""

from __future__ import annotations

import pytest
from demo_snapshots import pod, snapshot

from identity.spiffe import Identity
from nodeagent.mesh_feed import MeshFeed
from nodeagent.policies import PolicyLoader

pytestmark = pytest.mark.unit


class FakeProxy:
    def __init__(self) -> None:
        self.states: list[object] = []
        self.policies: list[object] = []

    def update_state(self, state: object) -> None:
        self.states.append(state)

    def update_policies(self, policies: object) -> int:
        self.policies.append(policies)
        return 0


class FakeCertificates:
    def __init__(self) -> None:
        self.tracked: set[Identity] = set()

    def track(self, identity: Identity) -> None:
        self.tracked.add(identity)

    def untrack(self, identity: Identity) -> None:
        self.tracked.discard(identity)


def test_certificates_follow_the_identities_enrolled_on_this_node() -> None:
    proxy, certs = FakeProxy(), FakeCertificates()
    feed = MeshFeed("node-1", proxy, certs, PolicyLoader("trellis-system"))  # type: ignore[arg-type]
    assert not feed.synced
    feed.apply(snapshot(pod("a", "198.18.1.10") + pod(
        "b", "198.18.2.10", node="node-2", sa="other")))
    assert certs.tracked == {Identity.of("demo", "web")}
    assert feed.synced and len(proxy.states) == 1 and len(proxy.policies) == 1
    feed.apply(snapshot(pod("a", "198.18.1.10", sa="api")))
    assert certs.tracked == {Identity.of("demo", "api")}
    feed.apply(snapshot(pod("a", "198.18.1.10", sa="api", mode="none")))
    assert certs.tracked == set()
