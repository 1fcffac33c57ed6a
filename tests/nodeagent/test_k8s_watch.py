"""The sans-IO half of list/watch: stream decoding, the object store, the backoff."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.k8s_watch import (
    Backoff,
    LineDecoder,
    ObjectStore,
    Resource,
    WatchFailed,
    WatchGone,
)

pytestmark = pytest.mark.unit

PODS = Resource("Pod", "v1", "/api/v1/pods")


def event(kind: str, name: str, rv: str, **more: object) -> dict[str, object]:
    return {"type": kind, "object": {"metadata": {"name": name, "namespace": "demo",
                                                  "resourceVersion": rv}, **more}}


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_decoder_is_indifferent_to_chunk_boundaries(cuts: list[int]) -> None:
    events = [event("ADDED", f"p{i}", str(i)) for i in range(5)]
    stream = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    decoder, out, at = LineDecoder(), [], 0
    for cut in cuts:
        out += decoder.feed(stream[at:at + cut])
        at += cut
    out += decoder.feed(stream[at:])
    assert out == events


def test_decoder_rejects_garbage() -> None:
    with pytest.raises(WatchFailed):
        LineDecoder().feed(b"<html>502 Bad Gateway</html>\n")
    with pytest.raises(WatchFailed):
        LineDecoder().feed(b'{"type": "ADDED"}\n')


def test_a_line_nested_deeper_than_the_stack_fails_the_watch_not_the_reflector() -> None:
    # Found reviewing tests/fuzz/fuzz_k8s_watch.py: json.loads raises RecursionError
    # for deep nesting, which the reflector's `except WatchFailed` does not catch.
    with pytest.raises(WatchFailed, match="not JSON lines"):
        LineDecoder().feed(b'{"type": "ADDED", "object": ' + b"[" * 100_000 + b"\n")


def test_store_applies_events_and_tracks_the_version() -> None:
    store = ObjectStore(PODS)
    store.replace({"metadata": {"resourceVersion": "10"}, "items": [
        {"metadata": {"name": "a", "namespace": "demo", "managedFields": [1]},
         "spec": {"nodeName": "n1", "containers": [{}]}, "status": {"podIP": "10.0.0.1"}}]})
    assert store.version == "10"
    # Stamped with kind/apiVersion (lists omit them) and trimmed to what is parsed.
    assert store.objects["demo/a"] == {"kind": "Pod", "apiVersion": "v1",
                                       "metadata": {"name": "a", "namespace": "demo"},
                                       "spec": {"nodeName": "n1"},
                                       "status": {"podIP": "10.0.0.1"}}
    assert store.apply(event("ADDED", "b", "11"))
    assert not store.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}})
    assert store.version == "15"
    assert store.apply(event("DELETED", "a", "16"))
    assert not store.apply(event("DELETED", "a", "17"))  # already gone: no change
    assert set(store.objects) == {"demo/b"} and store.version == "17"


def test_error_event_410_means_relist_and_others_mean_retry() -> None:
    store = ObjectStore(PODS)
    with pytest.raises(WatchGone):
        store.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    with pytest.raises(WatchFailed) as failed:
        store.apply({"type": "ERROR", "object": {"kind": "Status", "code": 500,
                                                 "message": "etcd down"}})
    assert failed.value.code == 500 and "etcd down" in str(failed.value)


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(initial_s=1, max_s=8)
    delays = [backoff.delay() for _ in range(6)]
    for delay, base in zip(delays, (1, 2, 4, 8, 8, 8), strict=True):
        assert base * 0.8 <= delay <= min(base * 1.2, 8)
    backoff.reset()
    assert backoff.delay() <= 1.2
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial_s=5, max_s=1)


def test_an_endpoint_slice_keeps_only_addresses_and_readiness() -> None:
    store = ObjectStore(Resource("EndpointSlice", "discovery.k8s.io/v1",
                                 "/apis/discovery.k8s.io/v1/endpointslices"))
    labels = {"kubernetes.io/service-name": "web"}
    store.replace({"metadata": {"resourceVersion": "3"}, "items": [
        {"metadata": {"name": "web-x", "namespace": "demo", "labels": labels},
         "addressType": "IPv4", "ports": [{"port": 8080}],
         "endpoints": [{"addresses": ["10.1.0.11"], "conditions": {"ready": False},
                        "nodeName": "n1", "targetRef": {"kind": "Pod", "name": "web-1"}},
                       "not-a-mapping"]}]})
    assert store.objects["demo/web-x"] == {
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "web-x", "namespace": "demo", "labels": labels},
        "addressType": "IPv4",
        # A wrong type is kept whole, so the parser can name it.
        "endpoints": [{"addresses": ["10.1.0.11"], "conditions": {"ready": False}},
                      "not-a-mapping"]}
