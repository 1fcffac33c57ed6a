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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from kubernetes_asyncio import client

from nodeagent.k8s_client import get_json, open_watch
from nodeagent.k8s_watch import Backoff, LineDecoder, ObjectStore, Resource, WatchFailed, WatchGone

log = logging.getLogger("trellis.nodeagent.k8s")

# What a broken connection to the API server looks like from aiohttp.
CONNECTION_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
SHORT_WATCH_S = 1.0


class Reflector:
    """Runs ``run()`` as a task; ``store`` always holds the last consistent view."""

    def __init__(self, api: client.ApiClient, resource: Resource, *,
                 on_change: Callable[[], None], backoff: Backoff,
                 watch_timeout_s: int = 300) -> None:
        self.api = api
        self.store = ObjectStore(resource)
        self.synced = asyncio.Event()
        self.relists = 0  # for tests and logs: how often 410 forced a fresh list
        self._on_change = on_change
        self._backoff = backoff
        self._watch_timeout_s = watch_timeout_s
        self._failing = False

    @property
    def path(self) -> str:
        return self.store.resource.path

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
                    "resource": self.path, "reason": str(gone)}})
                self.store.version = ""
                self.relists += 1
                gone_in_a_row += 1
                if gone_in_a_row > 1:  # a fresh list already expired: do not spin
                    await asyncio.sleep(self._backoff.delay())
                continue
            except (WatchFailed, *CONNECTION_ERRORS) as exc:
                delay = self._backoff.delay()
                if not self._failing:  # log the outage once, not every retry
                    log.warning("API server unreachable; retrying with backoff", extra={
                        "fields": {"resource": self.path, "error": repr(exc),
                                   "retry_in_s": round(delay, 2)}})
                self._failing = True
                await asyncio.sleep(delay)

    def _reached(self) -> None:
        if self._failing:
            log.info("API server reachable again", extra={"fields": {"resource": self.path}})
            self._failing = False

    async def _list(self) -> None:
        listed = await get_json(self.api, self.path)
        self.store.replace(listed)
        self._reached()
        self._backoff.reset()
        log.info("listed", extra={"fields": {"resource": self.path,
                                             "objects": len(self.store.objects),
                                             "resource_version": self.store.version}})
        self.synced.set()
        self._on_change()

    async def _watch(self) -> None:
        """Returns when the server ends the stream cleanly (its timeout); raises otherwise."""
        response = await open_watch(self.api, self.path, self.store.version,
                                    self._watch_timeout_s)
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
            raise WatchFailed(f"watch {self.path} ended at once without events")
