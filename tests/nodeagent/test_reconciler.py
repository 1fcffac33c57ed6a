"""The agent's reconcile loop with fakes for the proxy, redirection and certificates."""

from __future__ import annotations

import asyncio

import pytest

from identity.spiffe import Identity
from nodeagent.agent import Reconciler
from nodeagent.objects import parse_yaml
from nodeagent.policies import PolicyLoader
from nodeagent.redirect import PodNetwork

pytestmark = pytest.mark.unit

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {trellis.dev/dataplane-mode: ambient}}
"""


def pod(name: str, ip: str, *, node: str = "node-1", sa: str = "web", mode: str = "") -> str:
    labels = f"{{app: web{', trellis.dev/dataplane-mode: ' + mode if mode else ''}}}"
    return (f"---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n"
            f"  labels: {labels}\n  annotations: {{trellis.dev/netns: /run/netns/{name}}}\n"
            f"spec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n")


class FakeProxy:
    def __init__(self) -> None:
        self.pods: dict[str, str] = {}
        self.fail_next_add = False
        self.events: list[str] = []

    def update_state(self, state: object) -> None:
        pass

    def update_policies(self, policies: object) -> int:
        return 0

    async def add_pod(self, workload, netns_path: str) -> None:  # type: ignore[no-untyped-def]
        if self.fail_next_add:
            self.fail_next_add = False
            raise OSError("port 15008: address already in use")
        self.events.append(f"listen {workload.name}")
        self.pods[workload.uid] = netns_path

    async def remove_pod(self, uid: str) -> None:
        self.events.append(f"unlisten {uid}")
        self.pods.pop(uid, None)

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


class FakeCertificates:
    def __init__(self) -> None:
        self.tracked: set[Identity] = set()

    def track(self, identity: Identity) -> None:
        self.tracked.add(identity)

    def untrack(self, identity: Identity) -> None:
        self.tracked.discard(identity)


def make() -> tuple[Reconciler, FakeProxy, FakeRedirector, FakeCertificates]:
    proxy = FakeProxy()
    redirector = FakeRedirector(proxy.events)
    certs = FakeCertificates()
    reconciler = Reconciler("node-1", proxy, redirector, certs,  # type: ignore[arg-type]
                            PolicyLoader("trellis-system"))
    return reconciler, proxy, redirector, certs


def snapshot(*pods: str):  # type: ignore[no-untyped-def]
    return parse_yaml(NAMESPACE + "".join(pods), source="test.yaml")


def test_enrolls_listeners_before_rules_and_only_this_nodes_pods() -> None:
    reconciler, proxy, _redirector, certs = make()
    assert reconciler.not_ready_reason() is not None
    asyncio.run(reconciler.apply_snapshot(snapshot(
        pod("a", "198.18.1.10"), pod("b", "198.18.2.10", node="node-2"))))
    assert proxy.events == ["listen a", "rules demo/a"]
    assert certs.tracked == {Identity.of("demo", "web")}
    assert reconciler.not_ready_reason() is None


def test_a_failed_pod_is_retried_and_blocks_readiness_until_then() -> None:
    reconciler, proxy, redirector, _ = make()
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
    reconciler, proxy, redirector, certs = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", mode="none")))

    asyncio.run(scenario())
    assert proxy.events[-2:] == ["unrules demo/a", "unlisten demo/a"]
    assert not redirector.applied and not proxy.pods
    assert certs.tracked == set()


def test_a_changed_pod_ip_is_re_enrolled() -> None:
    reconciler, proxy, _redirector, _ = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.11")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a", "unrules demo/a", "unlisten demo/a",
                            "listen a", "rules demo/a"]


def test_a_new_service_account_re_enrolls_the_pod_under_its_new_identity() -> None:
    reconciler, proxy, _redirector, certs = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", sa="api")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a", "unrules demo/a", "unlisten demo/a",
                            "listen a", "rules demo/a"]
    assert certs.tracked == {Identity.of("demo", "api")}


def test_a_label_change_alone_leaves_the_pod_enrolled_as_it_is() -> None:
    reconciler, proxy, _redirector, _ = make()

    async def scenario() -> None:
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10")))
        await reconciler.apply_snapshot(snapshot(pod("a", "198.18.1.10", mode="ambient")))

    asyncio.run(scenario())
    assert proxy.events == ["listen a", "rules demo/a"]
