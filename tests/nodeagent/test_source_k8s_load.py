"""What the agents cost the API server (issue 17, API-server load): the split agent
watches only its own node's pods (``fieldSelector=spec.nodeName=<node>``) and the
namespaces, and every list comes in pages (``limit``/``continue``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import unquote

import pytest
from fake_apiserver import FakeApiServer
from k8s_support import (
    NAMESPACES,
    PODS,
    Follower,
    api_factory,
    enrolled,
    names,
    namespace,
    pod,
    source,
    write_kubeconfig,
)

from nodeagent.k8s_watch import Resource
from nodeagent.source_k8s import RESOURCES, agent_resources
from tunnel import tasks

pytestmark = pytest.mark.inprocess


def run(tmp_path: Path, server: FakeApiServer, resources: tuple[Resource, ...],
        body, *, extra_pods: int = 0, **options: object) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        await server.start()
        await server.apply(NAMESPACES, namespace("demo"))
        await server.apply(PODS, pod("web-1", "10.1.0.11"))
        await server.apply(PODS, pod("remote", "10.2.0.11", node="node-2"))
        for i in range(extra_pods):
            await server.apply(PODS, pod(f"extra-{i}", f"10.1.0.{20 + i}"))
        factory = await api_factory(write_kubeconfig(tmp_path / "kubeconfig", server))
        src = source(factory, resources=resources, **options)
        follower = Follower(src.snapshots())
        task = tasks.spawn(follower.run(), name="follow test source")
        try:
            await body(server, src, follower)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop()

    asyncio.run(main())


def pod_requests(server: FakeApiServer) -> list[str]:
    return [unquote(r) for r in server.requests if r.startswith("GET /api/v1/pods")]


def test_agent_watches_its_own_nodes_pods_only(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src, f: Follower) -> None:  # type: ignore[no-untyped-def]
        first = await f.until(lambda s: "web-1" in names(s))
        assert names(first) == {"web-1"}  # node-2's pod never reached this agent
        assert enrolled(first) == {"web-1"}
        await server.watching(len(src.reflectors))
        # A pod created unscheduled, then bound to this node: the watch sees it
        # enter the selection. One bound elsewhere never shows up.
        unscheduled = pod("web-2", "10.1.0.12", node="")
        await server.apply(PODS, unscheduled)
        await server.apply(PODS, pod("remote-2", "10.2.0.12", node="node-2"))
        await server.apply(PODS, pod("web-2", "10.1.0.12"))
        snap = await f.until(lambda s: "web-2" in names(s))
        assert names(snap) == {"web-1", "web-2"} and enrolled(snap) == {"web-1", "web-2"}
        await server.delete(PODS, "demo", "web-1")
        snap = await f.until(lambda s: "web-1" not in names(s))
        assert names(snap) == {"web-2"}
        # Every pods request, list and watch, asked for this node only.
        requests = pod_requests(server)
        assert requests and all("fieldSelector=spec.nodeName=node-1" in r for r in requests)
        assert {r.resource.path for r in src.reflectors} == {PODS, NAMESPACES}

    run(tmp_path, FakeApiServer(), agent_resources("node-1"), body)


def test_the_proxys_source_still_sees_every_pod(tmp_path: Path) -> None:
    # The control for the test above: the same cluster through the proxy's resources.
    async def body(server: FakeApiServer, src, f: Follower) -> None:  # type: ignore[no-untyped-def]
        snap = await f.until(lambda s: {"web-1", "remote"} <= names(s))
        assert enrolled(snap) == {"web-1"}
        assert not any("fieldSelector" in r for r in pod_requests(server))

    run(tmp_path, FakeApiServer(), RESOURCES, body)


def test_unsupported_field_selector_is_refused_like_the_api_server(tmp_path: Path) -> None:
    # The stand-in refuses what a real API server refuses, so a selector that only
    # the stand-in understood cannot pass here and fail on a cluster.
    bad = Resource("Pod", "v1", PODS, field_selector="spec.serviceAccountName=web")

    async def body(server: FakeApiServer, src, f: Follower) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(10):
            while len(pod_requests(server)) < 2:
                await asyncio.sleep(0.02)
        assert f.seen == []

    run(tmp_path, FakeApiServer(), (bad,), body)


def test_lists_come_in_pages_and_an_expired_page_relists(tmp_path: Path) -> None:
    async def body(server: FakeApiServer, src, f: Follower) -> None:  # type: ignore[no-untyped-def]
        snap = await f.until(lambda s: len(names(s)) == 7)
        # 7 pods in pages of 3: three requests, each with the limit, two continued.
        lists = [r for r in pod_requests(server) if "watch=1" not in r]
        assert len(lists) == 3 and all("limit=3" in r for r in lists)
        assert sum("continue=" in r for r in lists) == 2
        assert len(names(f.seen[0])) == 7  # the first snapshot waited for every page
        # While the API server is away, a pod is added and etcd compacts: the watch
        # must relist, and the relist's continue token expires too (410): start over.
        await server.stop()
        await server.apply(PODS, pod("late", "10.1.0.99"))
        server.compact()
        server.expire_next_continue = True
        await server.start()
        snap = await f.until(lambda s: "late" in names(s))
        assert len(names(snap)) == 8
        pods = next(r for r in src.reflectors if r.path == PODS)
        assert pods.relists >= 2  # the expired watch, then the expired page
        for seen in f.seen:
            assert len(names(seen)) >= 7  # no snapshot ever lost pods that existed

    run(tmp_path, FakeApiServer(), (RESOURCES[0], RESOURCES[1]), body, extra_pods=5,
        page_size=3)
