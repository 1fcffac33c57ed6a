"""Fuzz the agent → proxy control codec (tunnel/control.py).

Bytes are one SOCK_SEQPACKET record as the proxy receives it (at most
MAX_MESSAGE: the socket truncates longer records, and the server refuses those).
Whatever decodes must encode back to itself: the agent and the proxy share this
codec, and a message that changes on the way through is a bug too; and a pod it
accepts must have a valid SPIFFE identity.
"""

from __future__ import annotations

from identity.spiffe import Identity
from tunnel.control import MAX_MESSAGE, AddPod, ControlError, decode, encode

ALLOWED: tuple[type[BaseException], ...] = (ControlError,)
DICTIONARY = (b'"type"', b'"hello"', b'"add_pod"', b'"remove_pod"', b'"snapshot_sent"',
              b'"ack"', b'"error"', b'"node"', b'"version"', b'"workload"', b'"netns"',
              b'"uid"', b'"labels"', b'"enrolled"', b'"ip"',
              b"true", b"false", b"null", b"[]", b"{}", b"-0", b"1e999", b'"\\ud800"')


def one_input(data: bytes) -> None:
    message = decode(data[:MAX_MESSAGE])
    if isinstance(message, AddPod):  # the proxy asks for certificates by this identity
        identity = message.workload.identity
        assert Identity.parse(identity.uri) == identity, f"{identity.uri!r} is no SPIFFE ID"
    try:
        again = encode(message)
    except ControlError:
        return  # re-encoded with \u escapes it may outgrow MAX_MESSAGE: refused by name
    assert decode(again) == message, f"{message!r} did not survive encode/decode"
