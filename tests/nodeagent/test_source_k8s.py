"""The Kubernetes source with the real client library (kubernetes_asyncio over HTTP)
against the API-server stand-in: enrollment, relabelling, deletion, services,
policies, an expired watch, dropped connections."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer
from k8s_support import (
    ENDPOINT_SLICES,
    ISTIO_POLICIES,
    NAMESPACES,
    PODS,
    SERVICES,
    TRELLIS_POLICIES,
    WITH_ISTIO,
    Follower,
    api_factory,
    endpoint_slice,
    enrolled,
    names,
    namespace,
    pod,
    policy,
    service,
    source,
    watched,
    write_kubeconfig,
)

from nodeagent.k8s_watch import Backoff
from nodeagent.source_k8s import KubernetesSource
from tunnel import tasks

pytestmark = pytest.mark.inprocess

Body = Callable[[FakeApiServer, KubernetesSource, Follower], Awaitable[None]]


def run(tmp_path: Path, body: Body, *, server: FakeApiServer | None = None) -> None:
    server = server or FakeApiServer()

    async def main() -> None:
        await server.start()
        await server.apply(NAMESPACES, namespace("demo"))
        await server.apply(PODS, pod("web-1", "10.1.0.11"))
        factory = await api_factory(write_kubeconfig(tmp_path / "kubeconfig", server))
        src = source(factory)
        follower = Follower(src.snapshots())
        task = tasks.spawn(follower.run(), name="follow test source")
        try:
            await follower.until(lambda s: "web-1" in names(s))
            await server.watching(watched(src))
            await body(server, src, follower)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()

    asyncio.run(main())


def test_running_pods_found_at_start_and_enrolled(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        first = f.seen[0]
        assert enrolled(first) == {"web-1"}
        web = first.state.workloads[0]
        # Read from the API object exactly as from a YAML file.
        assert (web.uid, web.ip, web.namespace, web.service_account, web.node, web.netns) == (
            "uid-web-1", "10.1.0.11", "demo", "web", "node-1", "")
        assert first.source == "kubernetes" and first.errors == ()
        assert first.state.namespace_labels["demo"]["trellis.dev/dataplane-mode"] == "ambient"
        # Every request carried the kubeconfig's bearer token (else: 401 and no snapshot),
        # and every watch asked for bookmarks.
        watches = [r for r in server.requests if "watch=1" in r]
        assert watches and all("allowWatchBookmarks=true" in r for r in watches)

    run(tmp_path, body)


def test_new_pods_on_other_nodes_are_known_but_not_enrolled_here(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        await server.apply(PODS, pod("remote", "10.2.0.11", node="node-2"))
        snap = await f.until(lambda s: {"web-2", "remote"} <= names(s))
        assert enrolled(snap) == {"web-1", "web-2"}
        assert snap.state.workload_by_ip("10.2.0.11").node == "node-2"

    run(tmp_path, body)


def test_unenrollment_by_relabelling_pod_and_namespace(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        await server.apply(PODS, pod("web-1", "10.1.0.11",
                                     labels={"app": "web", "trellis.dev/dataplane-mode": "none"}))
        await f.until(lambda s: enrolled(s) == set() and "web-1" in names(s))
        await server.apply(PODS, pod("web-1", "10.1.0.11"))
        await f.until(lambda s: enrolled(s) == {"web-1"})
        await server.apply(NAMESPACES, namespace("demo", ambient=False))
        snap = await f.until(lambda s: enrolled(s) == set())
        assert "web-1" in names(snap)  # still known: other pods reach it in plaintext

    run(tmp_path, body)


def test_pod_deletion(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        await server.delete(PODS, "demo", "web-1")
        snap = await f.until(lambda s: "web-1" not in names(s))
        assert snap.state.workload_by_ip("10.1.0.11") is None

    run(tmp_path, body)


def test_service_endpoints_follow_endpoint_slices(tmp_path: Path) -> None:
    def endpoints(snap) -> list[str]:  # type: ignore[no-untyped-def]
        svc = snap.state.service_by_vip("10.96.0.10")
        return [w.name for w in snap.state.endpoints(svc)] if svc else []

    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        # The selector matches both pods, but a Service without slices (the
        # controller has not written them yet) has no endpoints.
        await server.apply(SERVICES, service("web", "10.96.0.10", {"app": "web"}))
        snap = await f.until(lambda s: s.state.service_by_vip("10.96.0.10") is not None)
        assert endpoints(snap) == []
        await server.apply(ENDPOINT_SLICES, endpoint_slice("web-a", "web", {"10.1.0.11": True}))
        await f.until(lambda s: endpoints(s) == ["web-1"])
        # A second slice of the same Service adds its address (no ready condition: ready).
        await server.apply(ENDPOINT_SLICES, endpoint_slice("web-b", "web", {"10.1.0.12": None}))
        await f.until(lambda s: endpoints(s) == ["web-1", "web-2"])
        # An endpoint marked not ready leaves, though its pod still matches the selector.
        await server.apply(ENDPOINT_SLICES, endpoint_slice("web-a", "web", {"10.1.0.11": False}))
        snap = await f.until(lambda s: endpoints(s) == ["web-2"])
        assert "web-1" in names(snap)
        # A slice adding an address adds it; one that is no workload is skipped.
        await server.apply(ENDPOINT_SLICES, endpoint_slice(
            "web-b", "web", {"10.1.0.12": True, "10.1.0.11": True, "192.0.2.7": True}))
        await f.until(lambda s: endpoints(s) == ["web-1", "web-2"])
        await server.delete(ENDPOINT_SLICES, "demo", "web-b")
        await f.until(lambda s: endpoints(s) == [])
        await server.delete(SERVICES, "demo", "web")
        snap = await f.until(lambda s: s.state.service_by_vip("10.96.0.10") is None)
        assert snap.state.services == () and snap.errors == ()

    run(tmp_path, body)


def test_policies_from_both_groups_added_changed_and_removed(tmp_path: Path) -> None:
    def policies(snap) -> dict[str, str]:  # type: ignore[no-untyped-def]
        return {f"{p['apiVersion']} {p['metadata']['name']}": p["spec"]["action"]
                for p in snap.policies}

    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io"))
        await server.apply(TRELLIS_POLICIES, policy("allow-web", "security.trellis.dev",
                                                    action="ALLOW"))
        await f.until(lambda s: policies(s) == {
            "security.istio.io/v1 deny-legacy": "DENY",
            "security.trellis.dev/v1 allow-web": "ALLOW"})
        await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io",
                                                  action="AUDIT"))
        await f.until(lambda s: policies(s).get("security.istio.io/v1 deny-legacy") == "AUDIT")
        await server.delete(TRELLIS_POLICIES, "demo", "allow-web")
        snap = await f.until(lambda s: len(s.policies) == 1)
        assert snap.policies[0]["kind"] == "AuthorizationPolicy"

    run(tmp_path, body, server=FakeApiServer(crds=WITH_ISTIO))


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_expired_watch_relists_without_losing_state_or_events(
        tmp_path: Path, gone_as_http: bool) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        # Cut the watches, change the cluster while they are down, and forget the
        # history: every reconnect now meets 410 and must relist to see the changes.
        server.drop_watches()
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        await server.delete(PODS, "demo", "web-1")
        await server.apply(ISTIO_POLICIES, policy("deny-legacy", "security.istio.io"))
        server.compact()
        # The pods relist is slow, so snapshots are built (from the other
        # resources' relists) while it is under way.
        server.list_delay_s[PODS] = 0.5
        count = len(f.seen)
        snap = await f.until(lambda s: names(s) == {"web-2"} and len(s.policies) == 1)
        assert sum(r.relists for r in src.reflectors) >= 1
        # While relisting, no snapshot lost an object that still existed: every
        # snapshot since the drop holds web-1 (not yet deleted as far as it knew)
        # or web-2 (the relist), and none is empty.
        for seen in f.seen[count:]:
            assert names(seen) & {"web-1", "web-2"}
        assert snap.state.workload_by_ip("10.1.0.12") is not None
        # And watching resumes after the relist: a later change still arrives.
        await server.apply(PODS, pod("web-3", "10.1.0.13"))
        await f.until(lambda s: names(s) == {"web-2", "web-3"})

    run(tmp_path, body, server=FakeApiServer(gone_as_http=gone_as_http, crds=WITH_ISTIO))


def test_dropped_watch_resumes_from_resource_version_without_relist(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        def lists() -> int:  # of served resources (the absent CRD is probed apart)
            return sum(1 for r in server.requests if "watch" not in r and ISTIO_POLICIES not in r)

        lists_before = lists()
        for i in range(3):
            await server.watching(watched(src))
            server.drop_watches()
            await server.apply(PODS, pod(f"web-{i + 2}", f"10.1.0.{i + 12}"))
        await f.until(lambda s: names(s) == {"web-1", "web-2", "web-3", "web-4"})
        assert sum(r.relists for r in src.reflectors) == 0
        assert lists() == lists_before
        resumed = [r for r in server.requests if "watch=1" in r and "/pods" in r]
        # Each reconnect resumed after the last version it had seen (bookmarks may
        # move it further), never from 0 or with a list.
        versions = [int(r.split("resourceVersion=")[1].split("&")[0]) for r in resumed]
        assert len(resumed) >= 4 and versions == sorted(versions) and versions[0] >= 101

    run(tmp_path, body)


def test_bookmarks_move_the_resume_point(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        # Changes only to services: the pods watch sees no event, only bookmarks.
        for i in range(3):
            await server.apply(SERVICES, service(f"s{i}", f"10.96.0.{20 + i}", {"app": "x"}))
        pods = next(r for r in src.reflectors if r.path == PODS)
        async with asyncio.timeout(5):
            while int(pods.store.version) < server.rv:
                await asyncio.sleep(0.05)
        # A watch expiring now is resumed from the bookmark, past the compaction.
        server.compact()
        server.drop_watches()
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        await f.until(lambda s: "web-2" in names(s))
        assert pods.relists == 0

    run(tmp_path, body)


def test_bursts_are_coalesced_into_few_snapshots(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        count = len(f.seen)
        for i in range(40):
            await server.apply(PODS, pod(f"burst-{i}", f"10.1.1.{i + 1}"))
        await f.until(lambda s: len(names(s)) == 41)
        assert len(f.seen) - count < 40

    run(tmp_path, body)


def test_bad_object_is_skipped_with_one_error_naming_it(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        bad = pod("broken", "not-an-ip")
        await server.apply(PODS, bad)
        snap = await f.until(lambda s: bool(s.errors))
        assert snap.errors == ("Pod demo/broken: status.podIP: 'not-an-ip' is not an IPv4 address",)
        assert names(snap) == {"web-1"}

    run(tmp_path, body)


def test_host_network_pods_are_known_but_never_enrolled(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        agent = pod("node-exporter", "192.168.1.10")
        agent["spec"]["hostNetwork"] = True
        await server.apply(PODS, agent)
        snap = await f.until(lambda s: "node-exporter" in names(s))
        assert enrolled(snap) == {"web-1"}

    run(tmp_path, body)


def test_watches_that_end_at_once_are_retried_with_backoff_not_in_a_spin(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted, not timed: every delay the watches' backoffs hand out is recorded
    # (with the loop's clock), and each retry must follow one of them, with
    # delays that grow and that were actually waited out.
    handed_out: dict[int, list[float]] = {}
    handed_at: dict[int, list[float]] = {}
    real_delay = Backoff.delay

    def recorded(self: Backoff) -> float:
        value = real_delay(self)
        handed_out.setdefault(id(self), []).append(value)
        handed_at.setdefault(id(self), []).append(asyncio.get_running_loop().time())
        return value

    monkeypatch.setattr(Backoff, "delay", recorded)

    async def body(server: FakeApiServer, src: KubernetesSource, f: Follower) -> None:
        watches = {id(r._backoff) for r in src.reflectors if not r.absent}
        handed_out.clear()
        handed_at.clear()
        server.end_watches_at_once = True
        server.drop_watches()
        before = len(server.requests)
        async with asyncio.timeout(10):
            while not all(len(handed_out.get(w, ())) >= 4 for w in watches):
                await asyncio.sleep(0.01)
        made = len(server.requests) - before
        slept = sum(len(handed_out.get(w, ())) for w in watches)
        # One watch request per backoff delay, plus the one each has in flight;
        # a spin would make thousands with none.
        assert made <= slept + len(watches), (made, slept)
        for w in watches:
            first = handed_out[w][:4]  # 0.05 s doubling, below the 0.5 s cap, ±20% jitter
            assert first[0] > 0 and all(b >= a * 1.3 for a, b in itertools.pairwise(first)), first
            # The next delay is asked for only after the previous one was slept:
            # a lower bound, which a busy machine cannot break.
            at = handed_at[w][:4]
            assert at[3] - at[0] >= sum(first[:3]) - 0.005, (at, first)
        server.end_watches_at_once = False
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        await f.until(lambda s: "web-2" in names(s))

    run(tmp_path, body)
