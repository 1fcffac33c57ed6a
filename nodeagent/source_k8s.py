"""A workload source backed by the Kubernetes API server (the node proxy, the agent, the CA).

What it list/watches depends on who reads it (ARCHITECTURE.md gives each watch's
cost per node):

- the node proxy (``RESOURCES``), cluster-wide: Pods (it maps every pod IP to a
  workload), Namespaces (their labels enroll pods), Services, EndpointSlices, and
  ``AuthorizationPolicy`` from ``security.istio.io/v1`` and ``security.trellis.dev/v1``;
- the split agent (``agent_resources``), which only enrolls: the Pods of its own
  node (``fieldSelector=spec.nodeName=<node>``) and the Namespaces;
- the CA: all Pods (``ca_k8s``).

Each resource has its own ``Reflector`` (paged list, then watch from the
resourceVersion, 410 → relist, backoff on failures). The policy collections are
CRD-backed: a cluster without Istio has no ``security.istio.io``, and a 404
there is an empty list, probed again until the CRD appears.

Service endpoints come from the Service's EndpointSlices (``discovery.k8s.io/v1``,
tied by the ``kubernetes.io/service-name`` label), ready endpoints only, never
from the selector: the EndpointSlice controller already applied it, and added
readiness, and selector-less Services get their endpoints the same way.

Snapshots: none until every resource has been listed once, or found not served
if it is CRD-backed (a partial first view
would unenroll pods whose namespace was not listed yet); after that, a burst of
events is coalesced for ``debounce_s`` into one snapshot. The objects go through
``nodeagent.objects.parse_documents``, the parser the YAML file uses, so the two
sources cannot disagree on what a Pod means.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from kubernetes_asyncio import client

from identity.spiffe import DEFAULT_TRUST_DOMAIN
from nodeagent.k8s_reflector import PAGE_SIZE, Reflector
from nodeagent.k8s_watch import Backoff, Resource
from nodeagent.objects import Snapshot, parse_documents
from tunnel import tasks

log = logging.getLogger("trellis.nodeagent.source")

PODS = Resource("Pod", "v1", "/api/v1/pods")
NAMESPACES = Resource("Namespace", "v1", "/api/v1/namespaces")
RESOURCES = (
    NAMESPACES,
    PODS,
    Resource("Service", "v1", "/api/v1/services"),
    Resource("EndpointSlice", "discovery.k8s.io/v1",
             "/apis/discovery.k8s.io/v1/endpointslices"),
    Resource("AuthorizationPolicy", "security.istio.io/v1",
             "/apis/security.istio.io/v1/authorizationpolicies", crd=True),
    Resource("AuthorizationPolicy", "security.trellis.dev/v1",
             "/apis/security.trellis.dev/v1/authorizationpolicies", crd=True),
)
# How often, at most, a missing CRD is probed for (backing off up to this from
# the first retry): one cheap 404 a minute per node and resource.
ABSENT_PROBE_MAX_S = 60.0


def agent_resources(node: str) -> tuple[Resource, ...]:
    """What the split agent needs to enroll pods: its node's pods and the namespaces'
    labels. The proxy, not the agent, needs the rest of the cluster."""
    return (NAMESPACES, dataclasses.replace(PODS, field_selector=f"spec.nodeName={node}"))


class KubernetesSource:
    """Snapshots of the cluster as the API server reports it."""

    def __init__(self, api_factory: Callable[[], client.ApiClient], *, node: str,
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, debounce_s: float = 0.1,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 absent_probe_max_s: float = ABSENT_PROBE_MAX_S,
                 watch_timeout_s: int = 300, page_size: int = PAGE_SIZE,
                 resources: tuple[Resource, ...] = RESOURCES) -> None:
        if debounce_s < 0:
            raise ValueError(f"debounce_s: {debounce_s!r} must not be negative")
        if page_size < 1:
            raise ValueError(f"page_size: {page_size!r} must be at least 1")
        # Validate now, at construction.
        Backoff(backoff_initial_s, backoff_max_s)
        Backoff(backoff_initial_s, max(backoff_initial_s, absent_probe_max_s))
        self.node = node
        self.trust_domain = trust_domain
        self.debounce_s = debounce_s
        self._api_factory = api_factory
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._absent_backoff = (backoff_initial_s, max(backoff_initial_s, absent_probe_max_s))
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._resources = resources  # the CA needs only pods (and RBAC for only those)
        self._changed = asyncio.Event()
        self._version = 0
        self.reflectors: tuple[Reflector, ...] = ()

    def _objects(self) -> list[dict[str, Any]]:
        # Namespaces first is not needed by the parser, but keeps errors in a
        # stable, readable order.
        return [obj for r in self.reflectors for obj in r.store.objects.values()]

    async def _snapshot(self) -> Snapshot:
        objects = self._objects()  # copied on the loop; parsed off it
        self._version += 1
        # Watching slices, a Service without one has no endpoints (yet): never
        # fall back to its selector, which would skip readiness.
        slices = any(r.kind == "EndpointSlice" for r in self._resources)
        snapshot = await asyncio.to_thread(
            parse_documents, objects, source="kubernetes", trust_domain=self.trust_domain,
            version=self._version, endpoint_slices=slices)
        for error in snapshot.errors:
            log.warning("object skipped", extra={"fields": {"node": self.node, "error": error}})
        log.info("workloads loaded", extra={"fields": {
            "source": "kubernetes", "version": self._version,
            "workloads": len(snapshot.state.workloads),
            "services": len(snapshot.state.services), "policies": len(snapshot.policies),
            "errors": len(snapshot.errors)}})
        return snapshot

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        api = self._api_factory()
        self.reflectors = tuple(
            Reflector(api, resource, on_change=self._changed.set,
                      backoff=Backoff(*self._backoff),
                      absent_backoff=Backoff(*self._absent_backoff),
                      watch_timeout_s=self._watch_timeout_s, page_size=self._page_size)
            for resource in self._resources)
        workers = [tasks.spawn(r.run(), name=f"watch {r.resource.label}")
                   for r in self.reflectors]
        try:
            # Synced means listed once, or found absent (a CRD the cluster lacks).
            await asyncio.gather(*(r.synced.wait() for r in self.reflectors))
            while True:
                self._changed.clear()
                yield await self._snapshot()
                await self._changed.wait()
                # Coalesce a burst (a rollout, a relist) into one snapshot.
                await asyncio.sleep(self.debounce_s)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await api.close()
