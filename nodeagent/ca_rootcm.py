"""The CA's trust bundle in every namespace, as ConfigMap ``trellis-ca-root-cert``
(key ``root-cert.pem``), the way istiod publishes ``istio-ca-root-cert``.

Workloads and tools read the mesh's roots from their own namespace, and the node
proxies mount the copy in the release namespace, so a root rotation reaches them
as a ConfigMap update instead of a restart (identity/trust_bundle.py).

Two reflectors (nodeagent/k8s_reflector.py) follow the namespaces and the
ConfigMaps of that one name (``fieldSelector=metadata.name=...``: one object per
namespace, whatever else namespaces hold). After any change the publisher makes
the cluster match:

- a namespace without the ConfigMap gets it (created; deleted ones come back);
- a ConfigMap whose resourceVersion is not one we wrote or checked is read
  (GET) and, if its ``root-cert.pem`` differs, replaced with an update that
  names the version read, so a concurrent writer's change is never blindly
  overwritten: a 409 is retried from the newer state;
- namespaces being deleted are skipped (the API server refuses new content).

A failed write is retried after a bounded backoff; the CA keeps serving
whatever happens here. Several CA replicas may publish at once: they write the
same bytes, and optimistic concurrency sorts out who wrote first.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry, Counter

from nodeagent.k8s_client import get_json, post_json, put_json
from nodeagent.k8s_reflector import CONNECTION_ERRORS, Reflector
from nodeagent.k8s_watch import Backoff, Resource, WatchFailed
from tunnel import tasks

log = logging.getLogger("trellis.ca.rootcm")

CONFIGMAP_NAME = "trellis-ca-root-cert"
CONFIGMAP_KEY = "root-cert.pem"
MANAGED_LABEL = "trellis.dev/ca-root"
NAMESPACES = Resource("Namespace", "v1", "/api/v1/namespaces")


class Outcome(enum.Enum):
    """What one namespace's reconcile did (the metric's label values)."""

    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"  # read after a foreign change; it already said the right thing
    FAILED = "failed"


class RootPublisher:
    """Keeps ConfigMap ``name`` with ``bundle_pem`` in every namespace. ``start()`` it."""

    def __init__(self, api: client.ApiClient, bundle_pem: bytes, *,
                 name: str = CONFIGMAP_NAME, registry: CollectorRegistry | None = None,
                 retry: Backoff | None = None) -> None:
        self._api = api
        self._bundle = bundle_pem.decode("ascii")
        self._name = name
        self._retry = retry or Backoff(0.5, 30.0)
        self._changed = asyncio.Event()
        self._verified: dict[str, str] = {}  # namespace → resourceVersion known good
        self._failing: set[str] = set()  # namespaces whose last write failed (logged once)
        self.namespaces = Reflector(api, NAMESPACES, on_change=self._changed.set,
                                    backoff=Backoff())
        self.configmaps = Reflector(
            api, Resource("ConfigMap", "v1", "/api/v1/configmaps",
                          field_selector=f"metadata.name={name}"),
            on_change=self._changed.set, backoff=Backoff())
        self.writes = Counter(
            "trellis_ca_root_configmap_writes", "Reconciles of the root ConfigMap in a "
            "namespace, by outcome.", ["result"], registry=registry or CollectorRegistry())
        for outcome in Outcome:
            self.writes.labels(result=outcome.value)
        self.reconciled = asyncio.Event()  # set after each pass that left nothing to retry
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            tasks.spawn(self.namespaces.run(), name="ca root configmap: namespaces"),
            tasks.spawn(self.configmaps.run(), name="ca root configmap: configmaps"),
            tasks.spawn(self._loop(), name="ca root configmap: publish")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self) -> None:
        await self.namespaces.synced.wait()
        await self.configmaps.synced.wait()
        self._changed.set()
        while True:
            await self._changed.wait()
            self._changed.clear()
            self.reconciled.clear()
            if await self.reconcile():
                self._retry.reset()
                self.reconciled.set()
            else:
                await asyncio.sleep(self._retry.delay())
                self._changed.set()

    async def reconcile(self) -> bool:
        """One pass over every namespace; False when something is left to retry."""
        present = self.configmaps.store.objects
        ok = True
        live: set[str] = set()
        for obj in list(self.namespaces.store.objects.values()):
            meta = obj.get("metadata", {})
            namespace = meta.get("name")
            if not isinstance(namespace, str) or meta.get("deletionTimestamp") or \
                    obj.get("status", {}).get("phase") == "Terminating":
                continue
            live.add(namespace)
            seen = present.get(f"{namespace}/{self._name}")
            version = seen.get("metadata", {}).get("resourceVersion") if seen else None
            if version is not None and version == self._verified.get(namespace):
                continue
            outcome = await self._reconcile_one(namespace, exists=seen is not None)
            self.writes.labels(result=outcome.value).inc()
            ok &= outcome is not Outcome.FAILED
        for gone in self._verified.keys() - live:  # bounded by the namespaces that exist
            del self._verified[gone]
        self._failing &= live
        return ok

    async def _reconcile_one(self, namespace: str, *, exists: bool) -> Outcome:
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        try:
            if not exists:
                try:
                    created = await post_json(self._api, path, self._object(namespace))
                    return self._wrote(namespace, created, Outcome.CREATED)
                except WatchFailed as exc:
                    if exc.code != 409:  # AlreadyExists: made since we looked
                        raise
            current = await get_json(self._api, f"{path}/{self._name}")
            if current.get("data", {}).get(CONFIGMAP_KEY) == self._bundle:
                return self._wrote(namespace, current, Outcome.UNCHANGED)
            body: dict[str, Any] = {**current, "data": {**current.get("data", {}),
                                                        CONFIGMAP_KEY: self._bundle}}
            updated = await put_json(self._api, f"{path}/{self._name}", body)
            return self._wrote(namespace, updated, Outcome.UPDATED)
        except (WatchFailed, *CONNECTION_ERRORS) as exc:
            if namespace not in self._failing:  # once per failing streak, not per retry
                self._failing.add(namespace)
                log.warning("cannot publish the root ConfigMap; retrying", extra={"fields": {
                    "namespace": namespace, "configmap": self._name, "error": str(exc)}})
            return Outcome.FAILED

    def _wrote(self, namespace: str, obj: dict[str, Any], outcome: Outcome) -> Outcome:
        self._verified[namespace] = str(obj.get("metadata", {}).get("resourceVersion", ""))
        self._failing.discard(namespace)
        if outcome is not Outcome.UNCHANGED:
            log.info("root ConfigMap %s", outcome.value, extra={"fields": {
                "namespace": namespace, "configmap": self._name}})
        return outcome

    def _object(self, namespace: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self._name, "namespace": namespace,
                             "labels": {MANAGED_LABEL: "true"}},
                "data": {CONFIGMAP_KEY: self._bundle}}
