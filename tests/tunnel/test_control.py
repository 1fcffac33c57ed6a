"""The agent → proxy control protocol: encoding, refusals by field, replay bookkeeping."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from tunnel.control import (
    Ack,
    AddPod,
    ControlError,
    Hello,
    RemovePod,
    Replay,
    SnapshotSent,
    decode,
    encode,
    workload_to_json,
)
from tunnel.state import Workload

pytestmark = pytest.mark.unit

WORKLOAD = Workload(uid="u-1", name="web-1", namespace="demo", node="node-1",
                    ip="198.18.1.10", service_account="web",
                    labels=MappingProxyType({"app": "web"}), enrolled=True,
                    netns="/run/netns/tlab-web-1", cgroup="/sys/fs/cgroup/x")


@pytest.mark.parametrize("message", [
    Hello("node-1"), AddPod(WORKLOAD, "/run/netns/tlab-web-1"), RemovePod("u-1"),
    SnapshotSent(), Ack(), Ack("add_pod demo/web-1: port 15008: in use")])
def test_every_message_survives_the_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


def _add_pod_with(**changes: object) -> bytes:
    workload = {**workload_to_json(WORKLOAD), **changes}
    return json.dumps({"type": "add_pod", "workload": workload, "netns": "/x"}).encode()


@pytest.mark.parametrize(("data", "error"), [
    (b"\xff", "not JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"type": "reboot"}', "type 'reboot' is not one of"),
    (b'{"type": "hello", "node": "n", "version": 2}', "hello.version: 2 is not"),
    (b'{"type": "hello", "node": "n", "version": true}', "hello.version: True is not a int"),
    (b'{"type": "remove_pod"}', "remove_pod.uid: missing"),
    (_add_pod_with(ip="10.0.0.300"), "add_pod.workload.ip: '10.0.0.300' is not an IPv4"),
    (_add_pod_with(uid=""), "add_pod.workload.uid: empty"),
    (_add_pod_with(labels={"app": 3}), "add_pod.workload.labels['app']: not a string"),
    (_add_pod_with(enrolled="yes"), "add_pod.workload.enrolled: 'yes' is not a bool"),
    # Found by tests/fuzz/fuzz_control.py's identity check: these decoded, and the
    # proxy would ask for certificates of identities no SPIFFE ID can name.
    (_add_pod_with(trust_domain="cluster.lo`cal"),
     "add_pod.workload.trust_domain: 'cluster.lo`cal' is not valid in a SPIFFE ID"),
    (_add_pod_with(namespace="d&emo"),
     "add_pod.workload.namespace: 'd&emo' is not valid in a SPIFFE ID"),
    (_add_pod_with(service_account="../web"),
     "add_pod.workload.service_account: '../web' is not valid in a SPIFFE ID"),
])
def test_a_bad_message_is_refused_by_field(data: bytes, error: str) -> None:
    with pytest.raises(ControlError, match=None) as caught:
        decode(data)
    assert error in str(caught.value)


def test_an_oversized_message_is_refused_before_it_is_sent() -> None:
    big = Workload(**{**{f: getattr(WORKLOAD, f) for f in (
        "uid", "name", "namespace", "node", "ip", "service_account", "enrolled")},
        "labels": {f"k{i}": "v" * 100 for i in range(1000)}})
    with pytest.raises(ControlError, match="over the limit"):
        encode(AddPod(big, "/x"))


def test_replay_marks_stale_only_what_was_not_named_since_hello() -> None:
    replay = Replay()
    replay.named("a")
    replay.named("b")
    replay.forgotten("b")  # named, then removed in the same replay
    assert not replay.complete
    assert replay.stale(["a", "b", "c"]) == ["b", "c"]
    assert replay.complete


@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b'{"type": "hello", "node": "n", "version": ' + b"1" * 5000 + b"}",
], ids=["nested-deeper-than-the-stack", "integer-over-the-conversion-limit"])
def test_json_the_decoder_cannot_take_is_refused_as_not_json(data: bytes) -> None:
    # Found reviewing tests/fuzz/fuzz_control.py: json.loads raises RecursionError for
    # deep nesting and a bare ValueError for an integer of over 4300 digits, and both
    # escaped decode(), so the control server's `except ControlError` did not catch them.
    with pytest.raises(ControlError, match="control message: not JSON"):
        decode(data)
