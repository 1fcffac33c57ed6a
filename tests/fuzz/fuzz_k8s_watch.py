"""Fuzz the Kubernetes watch-stream codec and the object readers behind it
(nodeagent/k8s_watch.py, nodeagent/objects.py, nodeagent/object_fields.py).

Input: the first byte picks the size of the chunks the body arrives in, the rest
is a watch body (one JSON event per line), as the API server streams it. Each
event goes to the store of its object's ``kind`` (Pod when it has none); an
event of type ``LIST`` (not a real watch type) stands for a list response and
goes through ``ObjectStore.replace``. When the stream ends, or breaks with the
codec's own error as the reflector would see it, everything stored is read into
a snapshot, as the agent does after every change: that must never raise.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from identity.spiffe import Identity
from nodeagent.k8s_watch import LineDecoder, ObjectStore, Resource, WatchFailed, WatchGone
from nodeagent.objects import Snapshot, parse_documents

ALLOWED: tuple[type[BaseException], ...] = (WatchGone, WatchFailed)
MAX_LEN = 16 * 1024
DICTIONARY = (b'"type"', b'"object"', b'"ADDED"', b'"MODIFIED"', b'"DELETED"', b'"BOOKMARK"',
              b'"ERROR"', b'"LIST"', b'"items"', b'"kind"', b'"Pod"', b'"Service"',
              b'"EndpointSlice"', b'"Namespace"', b'"metadata"', b'"name"', b'"namespace"',
              b'"labels"', b'"annotations"', b'"resourceVersion"', b'"spec"', b'"status"',
              b'"podIP"', b'"nodeName"', b'"serviceAccountName"', b'"hostNetwork"',
              b'"clusterIP"', b'"ports"', b'"port"', b'"targetPort"', b'"protocol"',
              b'"selector"', b'"addressType"', b'"IPv4"', b'"endpoints"', b'"addresses"',
              b'"conditions"', b'"ready"', b'"code"', b"410", b"\n",
              b"true", b"false", b"null", b"[]", b"{}", b"-0", b"1e999", b'"\\ud800"')

_RESOURCES = (
    Resource("Namespace", "v1", "/api/v1/namespaces"),
    Resource("Pod", "v1", "/api/v1/pods"),
    Resource("Service", "v1", "/api/v1/services"),
    Resource("EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/endpointslices"),
    Resource("AuthorizationPolicy", "security.istio.io/v1",
             "/apis/security.istio.io/v1/authorizationpolicies"),
)


def _store_for(stores: dict[str, ObjectStore], obj: dict[str, Any]) -> ObjectStore:
    kind = obj.get("kind")
    return stores.get(kind if isinstance(kind, str) else "Pod") or stores["Pod"]


def one_input(data: bytes) -> None:
    step = 1 + (data[0] if data else 0) * 32
    stores = {r.kind: ObjectStore(r) for r in _RESOURCES}
    decoder = LineDecoder()
    try:
        for start in range(1, len(data), step):
            for event in decoder.feed(data[start:start + step]):
                store = _store_for(stores, event["object"])
                if event.get("type") == "LIST":
                    store.replace(event["object"])
                else:
                    store.apply(event)
    except (WatchGone, WatchFailed):
        pass  # the reflector relists; what the stores hold is still read below
    docs = [obj for store in stores.values() for obj in store.objects.values()]
    check_snapshot(parse_documents(docs, source="fuzz", endpoint_slices=True))


def check_snapshot(snapshot: Snapshot) -> None:
    """What the proxy relies on in every snapshot the agent sends it."""
    addresses = [w.ip for w in snapshot.state.workloads if w.ip]
    addresses += [s.vip for s in snapshot.state.services if s.vip]
    assert len(addresses) == len(set(addresses)), "an address names two objects"
    for workload in snapshot.state.workloads:
        assert Identity.parse(workload.identity.uri) == workload.identity, workload
        if workload.ip:
            ipaddress.IPv4Address(workload.ip)
