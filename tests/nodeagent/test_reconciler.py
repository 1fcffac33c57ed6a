"""The agent's reconcile loop with fakes for the proxy, redirection and certificates."""

from __future__ import annotations

import asyncio

import pytest
from demo_snapshots import pod, snapshot

from nodeagent.agent import Reconciler
from nodeagent.redirect import PodNetwork

pytestmark = pytest.mark.unit


class FakeProxy:
    """A PodProxy whose link can drop (a new generation) or be down."""

    def __init__(self) -> None:
        self.pods: dict[str, str] = {}
        self.fail_next_add = False
        self.down = False
        self.generation = 1
        self.events: list[str] = []

    async def connect(self) -> int:
        if self.down:
            raise OSError("proxy control socket /run/x.sock: Connection refused")
        return self.generation

    async def add_pod(self, workload, netns_path: str) -> None:  # type: ignore[no-untyped-def]
        if self.fail_next_add:
            self.fail_next_add = False
            raise OSError("port 15008: address already in use")
        self.events.append(f"listen {workload.name}")
        self.pods[workload.uid] = netns_path

    async def remove_pod(self, uid: str) -> None:
        self.events.append(f"unlisten {uid}")
        self.pods.pop(uid, None)

    async def snapshot_sent(self) -> None:
        self.events.append("snapshot_sent")

    async def close(self) -> None:
        self.pods.clear()


class FakeRedirector:
    name = "fake"

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.applied: set[str] = set()

    def apply(self, pod: PodNetwork) -> None:
        self.events.append(f"rules {pod.key}")
        self.applied.add(pod.uid)

    def remove(self, pod: PodNetwork) -> None:
        self.events.append(f"unrules {pod.key}")
        self.applied.discard(pod.uid)


def make() -> tuple[Reconciler, FakeProxy, FakeRedirector]:
    proxy = FakeProxy()
    redirector = FakeRedirector(proxy.events)
    reconciler = Reconciler("node-1", proxy, redirector)  # type: ignore[arg-type]
    return reconciler, proxy, redirector


def test_enrolls_listeners_before_rules_and_only_this_nodes_pods() -> None:
    reconciler, proxy, _redirector = make()
    assert reconciler.not_ready_reason() is not None
    asyncio.run(reconciler.apply_snapshot(snapshot(
        pod("a", "198.18.1.10"), pod("b", "198.18.2.10", node="node-2"))))
    # The first link to a proxy is a replay too: it ends with snapshot_sent.
    assert proxy.events == ["listen a", "rules demo/a", "snapshot_sent"]
    assert reconciler.not_ready_reason() is None


def test_a_failed_pod_is_retried_and_blocks_readiness_until_then() -> None:
    reconciler, proxy, redirector = make()
    proxy.fail_next_add = True

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        reason = reconciler.not_ready_reason()
        assert reason is not None and "demo/a" in reason
        assert not redirector.applied  # no rules without listeners
        await reconciler.reconcile()

    asyncio.run(scenario())
    assert reconciler.not_ready_reason() is None
    assert redirector.applied == {"demo/a"}


def test_opting_out_removes_rules_before_listeners_and_stops_renewal() -> None:
    reconciler, proxy, redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", mode="none")))

    asyncio.run(scenario())
    assert proxy.events[-2:] == ["unrules demo/a", "unlisten demo/a"]
    assert not redirector.applied and not proxy.pods


def test_a_changed_pod_ip_is_re_enrolled() -> None:
    reconciler, proxy, _redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.11")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a", "snapshot_sent", "unrules demo/a",
                            "unlisten demo/a", "listen a", "rules demo/a"]


def test_a_new_service_account_re_enrolls_the_pod_under_its_new_identity() -> None:
    reconciler, proxy, _redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", sa="api")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a", "snapshot_sent", "unrules demo/a",
                            "unlisten demo/a", "listen a", "rules demo/a"]


def test_a_label_change_alone_leaves_the_pod_enrolled_as_it_is() -> None:
    reconciler, proxy, _redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", mode="ambient")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a", "snapshot_sent"]


def test_nothing_reaches_the_proxy_before_the_first_snapshot() -> None:
    reconciler, proxy, _redirector = make()
    # The timer ticks before the source answers: a replay now would tell the
    # proxy that no pods exist, and it would drop every one it serves.
    asyncio.run(reconciler.reconcile())
    assert proxy.events == []


def test_a_new_proxy_link_replays_every_pod_without_touching_redirection() -> None:
    reconciler, proxy, redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10"),
                                                 pod("b", "198.18.1.11")))
        proxy.events.clear()
        proxy.generation = 2  # the agent reconnected, perhaps to a restarted proxy
        await reconciler.reconcile()

    asyncio.run(scenario())
    assert sorted(proxy.events[:-1]) == ["listen a", "listen b"]
    assert proxy.events[-1] == "snapshot_sent"
    assert not any(e.startswith(("unrules", "unlisten")) for e in proxy.events)
    assert redirector.applied == {"demo/a", "demo/b"}


def test_an_unreachable_proxy_keeps_redirection_and_shows_in_readiness() -> None:
    reconciler, proxy, redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10"),
                                                 pod("b", "198.18.1.11")))
        proxy.down = True
        proxy.events.clear()
        # While the proxy is unreachable, b opts out: its redirection goes at once
        # (the proxy is told on the next link), a's stays.
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10"),
                                                 pod("b", "198.18.1.11", mode="none")))
        reason = reconciler.not_ready_reason()
        assert reason is not None and "Connection refused" in reason
        assert redirector.applied == {"demo/a"}
        proxy.down = False
        proxy.generation = 2
        proxy.events.clear()
        await reconciler.reconcile()

    asyncio.run(scenario())
    # The replay names a only, so the proxy drops b on snapshot_sent.
    assert proxy.events == ["listen a", "snapshot_sent"]
    assert reconciler.not_ready_reason() is None


def test_a_replay_that_fails_midway_does_not_end_until_every_pod_is_retold() -> None:
    reconciler, proxy, _redirector = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        proxy.generation = 2
        proxy.fail_next_add = True
        proxy.events.clear()
        await reconciler.reconcile()
        # snapshot_sent now would make the proxy drop a, which is still enrolled.
        assert proxy.events == []
        await reconciler.reconcile()

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "snapshot_sent"]


class FakeHostRules:
    def __init__(self) -> None:
        self.synced: list[frozenset[str]] = []
        self.removed = 0
        self.fail = ""

    def sync(self, pod_ips) -> bool:  # type: ignore[no-untyped-def]
        if self.fail:
            raise OSError(self.fail)
        self.synced.append(frozenset(pod_ips))
        return True

    def remove(self) -> None:
        self.removed += 1


def test_the_node_snats_probes_to_exactly_this_nodes_enrolled_pods() -> None:
    proxy = FakeProxy()
    host = FakeHostRules()
    reconciler = Reconciler("node-1", proxy, FakeRedirector(proxy.events),  # type: ignore[arg-type]
                            host_rules=host)

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(
            pod("a", "198.18.1.10"), pod("b", "198.18.2.10", node="node-2"),
            pod("c", "198.18.1.11", mode="none")))
        assert host.synced[-1] == {"198.18.1.10"}
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.12")))
        assert host.synced[-1] == {"198.18.1.12"}  # the old IP left with the old enrollment
        host.fail = "iptables-restore failed"
        await reconciler.apply_snapshot(snapshot())  # logged, retried on the next pass
        host.fail = ""
        await reconciler.reconcile()
        assert host.synced[-1] == frozenset()
        await reconciler.shutdown(remove_rules=False)  # a restart: probes keep working
        assert host.removed == 0
        await reconciler.shutdown(remove_rules=True)  # an uninstall: nothing left behind
        assert host.removed == 1

    asyncio.run(scenario())
