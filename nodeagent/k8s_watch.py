"""The Kubernetes list/watch protocol, sans-IO: decoding a watch stream, keeping one
resource's objects, and the retry backoff. ``k8s_reflector`` drives it over HTTP.

The protocol, as the API server speaks it:

- ``GET <collection>`` answers ``{"items": [...], "metadata": {"resourceVersion": RV}}``.
  Items in a list carry no ``kind``/``apiVersion``, so the reflector stamps them.
- ``GET <collection>?watch=1&resourceVersion=RV&allowWatchBookmarks=true`` streams
  one JSON object per line (chunked): ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR,
  "object": ...}``, every change *after* RV, in order.
- ``BOOKMARK`` carries only a newer ``metadata.resourceVersion``: nothing changed, but
  a later watch may resume from there instead of from an RV the server may forget.
- When RV is older than the server's history, the watch answers ``410 Gone``, either
  as the HTTP status or as an ``ERROR`` event whose object is a ``Status`` with
  ``code: 410``. The only way on is a fresh list.
- A list may come in pages (``limit``; ``metadata.continue`` names the next page,
  all pages are one read as of the first page's RV; an expired token is 410).
- ``fieldSelector`` narrows a list and its watch alike; an object that stops
  matching arrives on the watch as ``DELETED``.
- A collection whose API group nothing defines (a CRD not installed) answers
  ``404`` with a ``NotFound`` Status (older servers: a plain-text 404).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Bigger than any object the API server accepts (etcd's default limit is 1.5 MiB):
# a line longer than this is a broken stream, not a big pod.
MAX_LINE = 8 * 1024 * 1024


class WatchGone(Exception):
    """The resourceVersion is too old (410): relist."""


class WatchFailed(Exception):
    """The API server answered with an error; retry with backoff."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the HTTP status the server gave, if any


@dataclass(frozen=True, slots=True)
class Resource:
    """One collection the source list/watches, cluster-wide unless ``field_selector``
    narrows it (e.g. ``spec.nodeName=node-1``)."""

    kind: str
    api_version: str
    path: str  # the cluster-wide collection, e.g. /api/v1/pods
    # Defined by a CustomResourceDefinition, so a cluster may lack it: a 404 then
    # means "no such objects", not a failure.
    crd: bool = False
    field_selector: str = ""

    @property
    def namespaced(self) -> bool:
        return self.kind != "Namespace"

    @property
    def label(self) -> str:
        """The collection as logs and task names show it."""
        return f"{self.path}?fieldSelector={self.field_selector}" if self.field_selector \
            else self.path

    def query(self) -> list[tuple[str, str]]:
        """Query parameters every list and watch of this resource carries."""
        return [("fieldSelector", self.field_selector)] if self.field_selector else []


class LineDecoder:
    """Bytes of a chunked watch body → parsed JSON events, one per line."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        events: list[dict[str, Any]] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[:end + 1]
            if line:
                events.append(_event(line))
        if len(self._buffer) > MAX_LINE:
            raise WatchFailed(f"watch event longer than {MAX_LINE} bytes")
        return events


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the stack
        raise WatchFailed(f"watch stream is not JSON lines: {exc}") from None
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise WatchFailed("watch event without an object")
    return event


def resource_version(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return ""
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def status_error(status: Mapping[str, Any]) -> Exception:
    """An ``ERROR`` event's ``Status`` (or an error body) → the exception to act on."""
    code = status.get("code")
    message = status.get("message") or status.get("reason") or "no message"
    if code == 410:
        return WatchGone(str(message))
    return WatchFailed(f"API server error {code}: {message}",
                       code if isinstance(code, int) else None)


class ObjectStore:
    """One resource's current objects, as the API server last told us.

    ``replace`` takes a whole list at once, so a relist never shows a moment in
    which known objects are missing; ``apply`` takes one watch event.
    """

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = ""  # the resourceVersion to resume from; "" means list first

    def _stamp(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return {**trim(obj, self.resource.kind), "kind": self.resource.kind,
                "apiVersion": self.resource.api_version}

    def clear(self) -> None:
        """The collection is not served (its CRD is gone): no objects, list again."""
        self.objects = {}
        self.version = ""

    def replace(self, listed: Mapping[str, Any]) -> None:
        items = listed.get("items")
        if not isinstance(items, list):
            raise WatchFailed(f"{self.resource.path}: list without items")
        self.objects = {object_key(o): self._stamp(o) for o in items if isinstance(o, dict)}
        self.version = resource_version(listed)

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one watch event; True when the set of objects changed."""
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            raise status_error(obj)
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise WatchFailed(f"{self.resource.path}: unknown watch event type {kind!r}")
        if rv := resource_version(obj):
            self.version = rv
        if kind == "BOOKMARK":
            return False
        if kind == "DELETED":
            return self.objects.pop(object_key(obj), None) is not None
        self.objects[object_key(obj)] = self._stamp(obj)
        return True


# What nodeagent.objects reads, and nothing else: a cluster's pods carry
# managedFields, container specs and statuses that would multiply the agent's memory.
_KEEP = {
    # Creation and deletion times and the phase decide which pod owns a reused IP
    # and whether a finished pod still counts (nodeagent/pod_status.py).
    "metadata": ("name", "namespace", "uid", "labels", "annotations", "resourceVersion",
                 "creationTimestamp", "deletionTimestamp"),
    "spec": ("nodeName", "serviceAccountName", "hostNetwork", "clusterIP", "ports",
             "selector"),
    "status": ("podIP", "phase"),
}
# An EndpointSlice's payload is top-level; of each endpoint only addresses and
# readiness are read (not targetRef, zone, hints).
_SLICE_ENDPOINT_KEEP = ("addresses", "conditions")


def trim(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    if kind == "AuthorizationPolicy":
        return dict(obj)  # the policy loader owns its schema: pass it whole
    out: dict[str, Any] = {}
    for part, keys in _KEEP.items():
        value = obj.get(part)
        if isinstance(value, Mapping):
            out[part] = {k: value[k] for k in keys if k in value}
        elif value is not None:
            out[part] = value  # a wrong type is kept, so the parser can name it
    if kind == "EndpointSlice":
        out["addressType"] = obj.get("addressType")
        endpoints = obj.get("endpoints")
        out["endpoints"] = [
            {k: e[k] for k in _SLICE_ENDPOINT_KEEP if k in e} if isinstance(e, Mapping) else e
            for e in endpoints] if isinstance(endpoints, list) else endpoints
    return out


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with jitter, bounded by ``max_s``; ``reset`` after a success."""

    initial_s: float = 0.5
    max_s: float = 10.0
    _next: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff: need 0 < initial ({self.initial_s}) <= max ({self.max_s})")

    def delay(self) -> float:
        base = self._next or self.initial_s
        self._next = min(base * 2, self.max_s)
        # Jitter, so every agent in a cluster does not reconnect in the same instant
        # when the API server comes back.
        return min(base * random.uniform(0.8, 1.2), self.max_s)

    def reset(self) -> None:
        self._next = 0.0
