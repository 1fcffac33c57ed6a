"""The CA's root published to every namespace as ConfigMap trellis-ca-root-cert
(nodeagent/ca_rootcm.py), against the API-server stand-in: created where missing,
re-created when deleted, a foreign edit reverted, a terminating namespace
skipped, and the two races (AlreadyExists on create, a stale resourceVersion on
update) retried from the newer state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_apiserver import CONFIGMAPS, FakeApiServer
from k8s_support import NAMESPACES, namespace, write_kubeconfig
from prometheus_client import CollectorRegistry

from nodeagent import ca_rootcm
from nodeagent.ca_rootcm import CONFIGMAP_KEY, CONFIGMAP_NAME, RootPublisher
from nodeagent.k8s_client import api_client, load_configuration
from nodeagent.k8s_watch import Backoff

pytestmark = pytest.mark.inprocess

BUNDLE = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
WAIT_S = 10.0  # bound for "the publisher catches up"; never a speed claim


def configmap(ns: str, data: str) -> dict[str, Any]:
    return {"kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": CONFIGMAP_NAME, "namespace": ns},
            "data": {CONFIGMAP_KEY: data}}


def published(server: FakeApiServer, ns: str) -> str | None:
    obj = server._objects[CONFIGMAPS].get(f"{ns}/{CONFIGMAP_NAME}")
    return None if obj is None else obj.get("data", {}).get(CONFIGMAP_KEY)


async def until(check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[RootPublisher]:
    configuration = await load_configuration(write_kubeconfig(tmp_path / "kubeconfig", server))
    api = api_client(configuration)
    publisher = RootPublisher(api, BUNDLE, registry=CollectorRegistry(),
                              retry=Backoff(0.05, 0.2))
    publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()
        await api.close()


def writes(publisher: RootPublisher, result: str) -> float:
    return publisher.writes.labels(result=result)._value.get()


def test_every_namespace_gets_the_bundle_and_keeps_it(tmp_path: Path) -> None:
    async def main() -> None:
        server = FakeApiServer()
        await server.start()
        for name in ("demo", "other", "kube-system"):
            await server.apply(NAMESPACES, namespace(name, ambient=False))
        await server.apply(CONFIGMAPS, configmap("other", "stale"))
        await server.apply(CONFIGMAPS, configmap("kube-system", BUNDLE.decode()))
        try:
            async with running(server, tmp_path) as publisher:
                await asyncio.wait_for(publisher.reconciled.wait(), WAIT_S)
                assert {ns: published(server, ns) for ns in ("demo", "other", "kube-system")} \
                    == dict.fromkeys(("demo", "other", "kube-system"), BUNDLE.decode())
                assert (writes(publisher, "created"), writes(publisher, "updated"),
                        writes(publisher, "unchanged")) == (1, 1, 1)
                # One that already said the right thing was read, not rewritten.
                assert not any(r.startswith("PUT") and "kube-system" in r
                               for r in server.requests)

                await server.delete(CONFIGMAPS, "demo", CONFIGMAP_NAME)
                await until(lambda: published(server, "demo") == BUNDLE.decode())
                await server.apply(CONFIGMAPS, configmap("other", "edited by hand"))
                await until(lambda: published(server, "other") == BUNDLE.decode())
                # A namespace being deleted gets nothing; one created with it does
                # (the positive control that the publisher saw both).
                dying = namespace("dying", ambient=False)
                dying["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                await server.apply(NAMESPACES, dying)
                await server.apply(NAMESPACES, namespace("fresh", ambient=False))
                await until(lambda: published(server, "fresh") == BUNDLE.decode())
                assert published(server, "dying") is None
                assert writes(publisher, "failed") == 0
        finally:
            await server.stop()

    asyncio.run(main())


def test_races_with_another_writer_are_retried_from_the_newer_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        server = FakeApiServer()
        await server.start()
        await server.apply(NAMESPACES, namespace("demo", ambient=False))
        await server.apply(NAMESPACES, namespace("other", ambient=False))
        await server.apply(CONFIGMAPS, configmap("other", "stale"))
        real_post, real_get = ca_rootcm.post_json, ca_rootcm.get_json
        raced: set[str] = set()

        async def post_after_someone_else(api: Any, path: str, body: Any) -> Any:
            # Another CA replica creates it first: our create gets 409 AlreadyExists.
            if "demo" not in raced:
                raced.add("demo")
                await server.apply(CONFIGMAPS, configmap("demo", "from another writer"))
            return await real_post(api, path, body)

        async def get_then_someone_writes(api: Any, path: str, query: Any = None) -> Any:
            # We read version N; someone writes N+1 before our update: 409 Conflict.
            got = await real_get(api, path, query)
            if "/other/" in path and "other" not in raced:
                raced.add("other")
                await server.apply(CONFIGMAPS, configmap("other", "someone else's"))
            return got

        monkeypatch.setattr(ca_rootcm, "post_json", post_after_someone_else)
        monkeypatch.setattr(ca_rootcm, "get_json", get_then_someone_writes)
        try:
            async with running(server, tmp_path) as publisher:
                await until(lambda: published(server, "demo") == BUNDLE.decode()
                            and published(server, "other") == BUNDLE.decode())
                assert raced == {"demo", "other"}
                assert writes(publisher, "failed") == 1  # the stale update, then retried
                conflicts = [r for r in server.requests if r.startswith("PUT")]
                assert len(conflicts) >= 3  # demo's update, other's 409, other's retry
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_fake_server_refuses_what_a_real_one_refuses(tmp_path: Path) -> None:
    """The stand-in's own behaviour, which the tests above rely on."""
    from nodeagent.k8s_client import get_json, post_json, put_json
    from nodeagent.k8s_watch import WatchFailed

    async def main() -> None:
        server = FakeApiServer()
        await server.start()
        await server.apply(NAMESPACES, namespace("demo", ambient=False))
        api = api_client(await load_configuration(write_kubeconfig(tmp_path / "kc", server)))
        path = "/api/v1/namespaces/demo/configmaps"
        try:
            created = await post_json(api, path, configmap("demo", "a"))
            with pytest.raises(WatchFailed) as exists:
                await post_json(api, path, configmap("demo", "b"))
            assert exists.value.code == 409
            with pytest.raises(WatchFailed) as missing_ns:
                await post_json(api, "/api/v1/namespaces/nope/configmaps", configmap("nope", "a"))
            assert missing_ns.value.code == 404
            newer = await put_json(api, f"{path}/{CONFIGMAP_NAME}", {**created, "data": {"k": "1"}})
            with pytest.raises(WatchFailed) as stale:
                await put_json(api, f"{path}/{CONFIGMAP_NAME}", {**created, "data": {"k": "2"}})
            assert stale.value.code == 409
            assert (await get_json(api, f"{path}/{CONFIGMAP_NAME}"))["data"] == {"k": "1"}
            assert newer["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
        finally:
            await api.close()
            await server.stop()

    asyncio.run(main())
