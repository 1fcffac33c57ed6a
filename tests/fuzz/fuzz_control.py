"""Fuzz the agent → proxy control codec (tunnel/control.py).

Bytes are one SOCK_SEQPACKET record as the proxy receives it (at most
MAX_MESSAGE: the socket truncates longer records, and the server refuses those).
Whatever decodes must encode back to itself: the agent and the proxy share this
codec, and a message that changes on the way through is a bug too.
"""

from __future__ import annotations

from tunnel.control import MAX_MESSAGE, ControlError, decode, encode

ALLOWED: tuple[type[BaseException], ...] = (ControlError,)
DICTIONARY = (b'"type"', b'"hello"', b'"add_pod"', b'"remove_pod"', b'"snapshot_sent"',
              b'"ack"', b'"error"', b'"node"', b'"version"', b'"workload"', b'"netns"',
              b'"uid"', b'"labels"', b'"enrolled"', b'"ip"',
              b"true", b"false", b"null", b"[]", b"{}", b"-0", b"1e999", b'"\\ud800"')


def one_input(data: bytes) -> None:
    message = decode(data[:MAX_MESSAGE])
    try:
        again = encode(message)
    except ControlError:
        return  # re-encoded with \u escapes it may outgrow MAX_MESSAGE: refused by name
    assert decode(again) == message, f"{message!r} did not survive encode/decode"
