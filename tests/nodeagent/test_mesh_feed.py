"""The proxy's feed: state and policies handed over, certificates for this node's identities;
invalid policies keep their last valid version or fail closed."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from demo_snapshots import pod, snapshot

from identity.spiffe import Identity
from nodeagent.mesh_feed import MeshFeed
from nodeagent.policies import PolicyLoader
from policy import ConnectionFacts, Decision, PolicyIndex, Reason, evaluate
from tunnel.metrics import ProxyMetrics

pytestmark = pytest.mark.unit


class FakeProxy:
    def __init__(self) -> None:
        self.states: list[object] = []
        self.policies: list[object] = []
        self.inputs = SimpleNamespace(metrics=ProxyMetrics())

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


# Issue #10, finding 6: an invalid policy must not be dropped (that fails open).
def _deny(ip_blocks: str, name: str = "deny-legacy") -> str:
    return ("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: demo}}\n"
            "spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n"
            f"  rules:\n  - from:\n    - source: {{ipBlocks: {ip_blocks}}}\n")


def _allow_port(port: str) -> str:
    return ("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: only-8080, namespace: demo}\n"
            "spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n"
            f"  rules:\n  - to:\n    - operation: {{ports: [\"{port}\"]}}\n")


GOOD_DENY = _deny('["198.18.1.5"]')
BAD_DENY = _deny('["198.18.1.5", "10.0.0.300/8"]')
BAD_FIELD = "rules[0].from[0].source.ipBlocks[1]"


def _decide(proxy: FakeProxy, source_ip: str, *, port: int = 8080,
            labels: dict[str, str] | None = None) -> Decision:
    """The decision the proxy's latest policies make for a connection to pod a."""
    index = proxy.policies[-1]
    assert isinstance(index, PolicyIndex)
    return evaluate(ConnectionFacts(
        source_principal=None, source_ip=source_ip, source_namespace=None,
        dest_namespace="demo", dest_labels=labels or {"app": "web"}, dest_ip="198.18.1.10",
        dest_port=port), index)


def _invalid_gauge(proxy: FakeProxy, policy: str, fallback: str) -> float | None:
    value: float | None = proxy.inputs.metrics.registry.get_sample_value(
        "trellis_policy_invalid", {"policy": policy, "fallback": fallback})
    return value


def _feed() -> tuple[MeshFeed, FakeProxy]:
    proxy = FakeProxy()
    feed = MeshFeed("node-1", proxy, FakeCertificates(),  # type: ignore[arg-type]
                    PolicyLoader("trellis-system"))
    return feed, proxy


POD = pod("a", "198.18.1.10")


def test_an_invalid_edit_keeps_the_last_valid_deny_in_force(
        caplog: pytest.LogCaptureFixture) -> None:
    feed, proxy = _feed()
    feed.apply(snapshot(POD + GOOD_DENY))
    assert _decide(proxy, "198.18.1.5").reason == Reason.DENIED_BY_POLICY
    with caplog.at_level(logging.ERROR, logger="trellis.nodeagent.policy"):
        feed.apply(snapshot(POD + BAD_DENY))
    # The old DENY still decides, as written: not a deny-everything stand-in.
    assert _decide(proxy, "198.18.1.5") == Decision(False, "demo/deny-legacy", 0,
                                                    Reason.DENIED_BY_POLICY)
    assert _decide(proxy, "198.18.1.6").allowed
    assert _invalid_gauge(proxy, "demo/deny-legacy", "last_valid") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert f"demo/deny-legacy: {BAD_FIELD}: '10.0.0.300/8' is not a CIDR" in messages
    fallback = next(r for r in caplog.records if "last valid version" in r.getMessage())
    assert fallback.fields["field"] == BAD_FIELD  # type: ignore[attr-defined]

    # The same broken snapshot again logs nothing new; the fix clears the gauge.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trellis.nodeagent.policy"):
        feed.apply(snapshot(POD + BAD_DENY))
    assert caplog.records == []
    feed.apply(snapshot(POD + _deny('["198.18.1.7"]')))
    assert _decide(proxy, "198.18.1.5").allowed and not _decide(proxy, "198.18.1.7").allowed
    assert _invalid_gauge(proxy, "demo/deny-legacy", "last_valid") is None


def test_a_never_valid_deny_with_one_bad_cidr_denies_the_source() -> None:
    feed, proxy = _feed()
    feed.apply(snapshot(POD))
    assert _decide(proxy, "198.18.1.5").allowed  # positive control: no policy, allowed
    feed.apply(snapshot(POD + BAD_DENY))
    assert _decide(proxy, "198.18.1.5") == Decision(False, "demo/deny-legacy", None,
                                                    Reason.INVALID_POLICY)
    assert _invalid_gauge(proxy, "demo/deny-legacy", "fail_closed") == 1
    # Deleting it forgets it: no memory of a version that no longer exists.
    feed.apply(snapshot(POD))
    assert _decide(proxy, "198.18.1.5").allowed
    assert _invalid_gauge(proxy, "demo/deny-legacy", "fail_closed") is None


def test_a_never_valid_allow_denies_the_workloads_it_selects() -> None:
    feed, proxy = _feed()
    feed.apply(snapshot(POD + _allow_port("80a")))
    assert _decide(proxy, "198.18.1.5") == Decision(False, "demo/only-8080", None,
                                                    Reason.INVALID_POLICY)
    assert _decide(proxy, "198.18.1.5", labels={"app": "other"}).allowed
    feed.apply(snapshot(POD + _allow_port("8080")))
    assert _decide(proxy, "198.18.1.5").allowed
    feed.apply(snapshot(POD + _allow_port("80a")))  # an invalid edit: 8080 stays allowed
    assert _decide(proxy, "198.18.1.5").allowed
    assert not _decide(proxy, "198.18.1.5", port=8081).allowed
