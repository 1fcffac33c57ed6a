"""Keep one resource's objects in step with the API server: list, then watch, forever.

- A watch resumes from the last resourceVersion seen, bookmarks included, so a
  dropped connection or a watch the server timed out costs no relist and loses
  no event.
- ``410 Gone`` (HTTP status or ``ERROR`` event) means our version is older than
  the server's history: relist at once. The old objects stay in force until the
  new list has arrived whole, and then are replaced in one step, so no snapshot
  ever shows a cluster missing objects that still exist.
- Anything else that fails (connection refused while the API server restarts, a
  5xx, a broken stream) is retried with bounded exponential backoff, from the
  same resourceVersion.
- A CRD-backed resource the server does not serve (404: Istio's CRDs on a cluster
  without Istio, or a CRD deleted while we watched) is an empty, synced list: its
  objects are dropped, and the list is probed again with a backoff of its own
  (capped at ``absent_backoff.max_s``) until the CRD appears, as Istio's delayed
  informers do. Logged once when it goes and once when it comes. A core
  resource's 404 stays a failure: it would mean a broken API server or path.
- Lists are read in pages of ``page_size`` (``limit``/``continue``), so neither
  side holds one huge response; a page token that expired (410) relists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from kubernetes_asyncio import client

from nodeagent.k8s_client import get_json, open_watch
from nodeagent.k8s_watch import (
    Backoff,
    LineDecoder,
    ObjectStore,
    Resource,
    WatchFailed,
    WatchGone,
    resource_version,
)

log = logging.getLogger("trellis.nodeagent.k8s")

# What a broken connection to the API server looks like from aiohttp.
CONNECTION_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
SHORT_WATCH_S = 1.0
PAGE_SIZE = 500  # client-go's default for informers' lists
# A list of more pages than this is a server that never stops handing out
# continue tokens, not a cluster (500 × 10,000 objects).
MAX_PAGES = 10_000


class Reflector:
    """Runs ``run()`` as a task; ``store`` always holds the last consistent view."""

    def __init__(self, api: client.ApiClient, resource: Resource, *,
                 on_change: Callable[[], None], backoff: Backoff,
                 absent_backoff: Backoff | None = None,
                 watch_timeout_s: int = 300, page_size: int = PAGE_SIZE) -> None:
        self.api = api
        self.store = ObjectStore(resource)
        self.synced = asyncio.Event()
        self.relists = 0  # for tests and logs: how often 410 forced a fresh list
        self.absent = False  # a CRD-backed resource the server does not serve (now)
        self._on_change = on_change
        self._backoff = backoff
        self._absent_backoff = absent_backoff or Backoff(1.0, 60.0)
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._failing = False

    @property
    def path(self) -> str:
        return self.store.resource.path

    @property
    def resource(self) -> Resource:
        return self.store.resource

    async def run(self) -> None:
        gone_in_a_row = 0
        while True:
            try:
                if not self.store.version:
                    await self._list()
                await self._watch()
                gone_in_a_row = 0
            except WatchGone as gone:
                log.info("watch expired; relisting", extra={"fields": {
                    "resource": self.resource.label, "reason": str(gone)}})
                self.store.version = ""
                self.relists += 1
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a fresh list already expired: do not spin
                    await asyncio.sleep(self._backoff.delay())
                continue
            except (WatchFailed, *CONNECTION_ERRORS) as exc:
                if isinstance(exc, WatchFailed) and exc.code == 404 and self.resource.crd:
                    self._not_served()
                    await asyncio.sleep(self._absent_backoff.delay())
                    continue
                delay = self._backoff.delay()
                if not self._failing:  # log the outage once, not every retry
                    log.warning("API server unreachable; retrying with backoff", extra={
                        "fields": {"resource": self.resource.label, "error": repr(exc),
                                   "retry_in_s": round(delay, 2)}})
                self._failing = True
                await asyncio.sleep(delay)

    def _not_served(self) -> None:
        """The server answered, and has no such collection: an empty, synced list."""
        self._reached()
        self._backoff.reset()
        had_objects = bool(self.store.objects)
        self.store.clear()
        if not self.absent:  # once per disappearance, not per probe
            log.info("resource not served (its CRD is not installed): no objects of it "
                     "until it appears", extra={"fields": {
                         "resource": self.resource.label,
                         "probe_max_s": self._absent_backoff.max_s}})
            self.absent = True
        first = not self.synced.is_set()
        self.synced.set()
        if had_objects or first:
            self._on_change()

    def _reached(self) -> None:
        if self._failing:
            log.info("API server reachable again", extra={"fields": {
                "resource": self.resource.label}})
            self._failing = False

    async def _list(self) -> None:
        self.store.replace(await self._read_pages())
        self._reached()
        self._backoff.reset()
        if self.absent:
            log.info("resource served now (its CRD was installed)", extra={"fields": {
                "resource": self.resource.label}})
            self.absent = False
            self._absent_backoff.reset()
        log.info("listed", extra={"fields": {"resource": self.resource.label,
                                             "objects": len(self.store.objects),
                                             "resource_version": self.store.version}})
        self.synced.set()
        self._on_change()

    async def _read_pages(self) -> dict[str, object]:
        """The whole list, page by page, as one list as of the first page's version."""
        items: list[object] = []
        version, token = "", ""
        for _ in range(MAX_PAGES):
            query = [*self.resource.query(), ("limit", str(self._page_size))]
            if token:
                query.append(("continue", token))
            page = await get_json(self.api, self.path, query)
            page_items = page.get("items")
            if not isinstance(page_items, list):
                raise WatchFailed(f"{self.resource.label}: list without items")
            items.extend(page_items)
            version = version or resource_version(page)
            meta = page.get("metadata")
            more = meta.get("continue") if isinstance(meta, dict) else None
            if not isinstance(more, str) or not more:
                return {"items": items, "metadata": {"resourceVersion": version}}
            token = more
        raise WatchFailed(f"{self.resource.label}: list goes on past {MAX_PAGES} pages")

    async def _watch(self) -> None:
        """Returns when the server ends the stream cleanly (its timeout); raises otherwise."""
        response = await open_watch(self.api, self.path, self.store.version,
                                    self._watch_timeout_s, self.resource.query())
        self._reached()
        decoder = LineDecoder()
        started, events, changed = time.monotonic(), 0, False
        try:
            async for chunk in response.content.iter_any():
                for event in decoder.feed(chunk):
                    events += 1
                    changed |= self.store.apply(event)
                if changed:
                    self._on_change()
                    changed = False
        finally:
            if changed:  # events applied before an error in the same chunk
                self._on_change()
            response.release()
            worked = events > 0 or time.monotonic() - started >= SHORT_WATCH_S
            if worked:  # only a watch that worked ends an outage's backoff
                self._backoff.reset()
        if not worked:
            # Like client-go: a watch the server ends at once, empty, is a failure
            # (a proxy in the way, an overloaded server), or we would spin.
            raise WatchFailed(f"watch {self.resource.label} ended at once without events")
