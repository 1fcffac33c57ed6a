"""CRD-backed resources a cluster may lack (issue 17, blocker 1): Istio's
``security.istio.io`` on a cluster with Trellis alone. The API-server stand-in
serves only the chart's CRDs by default and answers 404 for the rest, as a real
API server does; the source must count a missing CRD as an empty list, and pick
it up when it is installed later."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fake_apiserver import CHART_CRDS, FakeApiServer
from k8s_support import (
    ISTIO_POLICIES,
    NAMESPACES,
    PODS,
    TRELLIS_POLICIES,
    Follower,
    api_factory,
    names,
    namespace,
    pod,
    policy,
    source,
    watched,
    write_kubeconfig,
)

from nodeagent.k8s_watch import Resource
from nodeagent.objects import Snapshot
from nodeagent.policies import PolicyLoader
from nodeagent.source_k8s import KubernetesSource
from policy.evaluate import evaluate
from policy.facts import ConnectionFacts
from tunnel import tasks

pytestmark = pytest.mark.inprocess

FIRST_SNAPSHOT_S = 5.0  # the bound: a snapshot within 5 s of start
LEGACY = "spiffe://cluster.local/ns/demo/sa/legacy"
OTHER = "spiffe://cluster.local/ns/demo/sa/frontend"


def allowed(snapshot: Snapshot, principal: str) -> bool:
    """The proxy's verdict, with the proxy's own policy loader, for a connection
    from ``principal`` to web-1."""
    index = PolicyLoader("trellis-system").load(snapshot.policies, "kubernetes")
    facts = ConnectionFacts(source_principal=principal, source_ip="10.1.0.99",
                            source_namespace="demo", dest_namespace="demo",
                            dest_labels={"app": "web"}, dest_ip="10.1.0.11", dest_port=8080)
    return evaluate(facts, index).allowed


async def started(tmp_path: Path, server: FakeApiServer,
                  **options: object) -> tuple[KubernetesSource, Follower, asyncio.Task[None]]:
    await server.start()
    await server.apply(NAMESPACES, namespace("demo"))
    await server.apply(PODS, pod("web-1", "10.1.0.11"))
    factory = await api_factory(write_kubeconfig(tmp_path / "kubeconfig", server))
    src = source(factory, **options)
    follower = Follower(src.snapshots())
    return src, follower, tasks.spawn(follower.run(), name="follow test source")


async def stopped(server: FakeApiServer, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await server.stop()


def test_fake_serves_the_charts_crds_only() -> None:
    # The stand-in is what makes the tests below honest: no Istio group unless asked.
    assert CHART_CRDS == {TRELLIS_POLICIES}

    async def main() -> None:
        server = FakeApiServer()
        await server.start()
        try:
            with pytest.raises(ValueError, match="install its CRD first"):
                await server.apply(ISTIO_POLICIES, policy("p", "security.istio.io"))
            await server.install_crd(ISTIO_POLICIES)
            await server.apply(ISTIO_POLICIES, policy("p", "security.istio.io"))
        finally:
            await server.stop()

    asyncio.run(main())


@pytest.mark.parametrize("not_found_as_text", [False, True], ids=["status-404", "text-404"])
def test_synced_without_istio_crds(tmp_path: Path, not_found_as_text: bool,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trellis.nodeagent.k8s")

    async def main() -> None:
        server = FakeApiServer(not_found_as_text=not_found_as_text)
        src, follower, task = await started(tmp_path, server)
        try:
            await server.apply(TRELLIS_POLICIES, policy("deny-legacy", "security.trellis.dev"))
            snap = await follower.until(lambda s: "web-1" in names(s) and len(s.policies) == 1,
                                        timeout=FIRST_SNAPSHOT_S)
            # The chart's own group is read (positive control); Istio's is empty.
            assert snap.policies[0]["apiVersion"] == "security.trellis.dev/v1"
            istio = next(r for r in src.reflectors if r.path == ISTIO_POLICIES)
            assert istio.absent and istio.synced.is_set() and not istio.store.objects
            # Probed again with backoff (0.05 s doubling), not in a spin, and the
            # absence is logged once, not per probe.
            before = sum(ISTIO_POLICIES in r for r in server.requests)
            await asyncio.sleep(1.0)
            probes = sum(ISTIO_POLICIES in r for r in server.requests) - before
            assert 1 <= probes <= 8, probes
            absent_lines = [r for r in caplog.records if "not served" in r.getMessage()]
            assert len(absent_lines) == 1
            # A core resource's failure is not mistaken for this: nothing else is absent.
            assert [r.path for r in src.reflectors if r.absent] == [ISTIO_POLICIES]
        finally:
            await stopped(server, task)

    asyncio.run(main())


def test_crd_installed_later_is_picked_up_and_its_policies_enforced(tmp_path: Path) -> None:
    async def main() -> None:
        server = FakeApiServer()
        src, follower, task = await started(tmp_path, server, absent_probe_max_s=0.2)
        try:
            first = await follower.until(lambda s: "web-1" in names(s), timeout=FIRST_SNAPSHOT_S)
            assert allowed(first, LEGACY)  # no policy yet
            # Istio is installed after Trellis: its CRD, then a DENY policy.
            await server.install_crd(ISTIO_POLICIES)
            await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io"))
            snap = await follower.until(lambda s: len(s.policies) == 1)
            assert not allowed(snap, LEGACY)
            assert allowed(snap, OTHER)  # the policy denies the one principal only
            istio = next(r for r in src.reflectors if r.path == ISTIO_POLICIES)
            assert not istio.absent
            # Watching now, not only listed: a change arrives as an event.
            await server.watching(watched(src))
            await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io",
                                                      action="AUDIT"))
            snap = await follower.until(lambda s: s.policies[0]["spec"]["action"] == "AUDIT")
            assert allowed(snap, LEGACY)
        finally:
            await stopped(server, task)

    asyncio.run(main())


def test_crd_deleted_while_watched_drops_its_policies_and_comes_back(tmp_path: Path) -> None:
    async def main() -> None:
        server = FakeApiServer(crds=CHART_CRDS | {ISTIO_POLICIES})
        src, follower, task = await started(tmp_path, server, absent_probe_max_s=0.2)
        try:
            await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io"))
            await follower.until(lambda s: len(s.policies) == 1, timeout=FIRST_SNAPSHOT_S)
            await server.watching(watched(src))
            await server.uninstall_crd(ISTIO_POLICIES)  # Istio uninstalled
            snap = await follower.until(lambda s: not s.policies)
            assert "web-1" in names(snap)  # the rest of the view is untouched
            istio = next(r for r in src.reflectors if r.path == ISTIO_POLICIES)
            async with asyncio.timeout(5):
                while not istio.absent:
                    await asyncio.sleep(0.02)
            await server.install_crd(ISTIO_POLICIES)
            await server.apply(ISTIO_POLICIES, policy("deny-again", "security.istio.io"))
            snap = await follower.until(lambda s: len(s.policies) == 1)
            assert snap.policies[0]["metadata"]["name"] == "deny-again"
        finally:
            await stopped(server, task)

    asyncio.run(main())


def test_a_core_resource_404_is_still_a_failure(tmp_path: Path) -> None:
    # Only CRD-backed resources may be absent: a 404 for pods is a broken server
    # or path, and the source must not report a cluster without pods.
    async def main() -> None:
        server = FakeApiServer()
        await server.start()
        await server.apply(NAMESPACES, namespace("demo"))
        factory = await api_factory(write_kubeconfig(tmp_path / "kubeconfig", server))
        broken = Resource("Pod", "v1", "/api/v1/podz")
        src = source(factory, resources=(broken,))
        follower = Follower(src.snapshots())
        task = tasks.spawn(follower.run(), name="follow test source")
        try:
            async with asyncio.timeout(10):
                while sum("/api/v1/podz" in r for r in server.requests) < 3:
                    await asyncio.sleep(0.02)
            assert follower.seen == []
            assert not src.reflectors[0].absent
        finally:
            await stopped(server, task)

    asyncio.run(main())
