"""Fuzz the CNI plugin ↔ agent framing and messages (nodeagent/cni/protocol.py).

Bytes are what arrives on the agent's unix socket (or, for a plugin, the
agent's answer), fed in the pieces a stream socket may cut them into: the
first byte picks the piece size. Every whole frame is read both as a call (the
agent's side) and as a reply (the plugin's side); a message that parses must
encode back to the same message.
"""

from __future__ import annotations

from nodeagent.cni.protocol import (
    FrameReader,
    PluginCall,
    PluginReply,
    ProtocolError,
    encode_call,
    encode_reply,
    parse_call,
    parse_reply,
)

ALLOWED: tuple[type[BaseException], ...] = (ProtocolError,)
MAX_LEN = 16 * 1024


def _frames(data: bytes) -> list[bytes]:
    step = 1 + (data[0] if data else 0) * 64
    reader, frames = FrameReader(), []
    for start in range(1, len(data), step):
        reader.feed(data[start:start + step])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
    return frames


def _round_trip(message: PluginCall | PluginReply) -> None:
    reader = FrameReader()
    reader.feed(encode_call(message) if isinstance(message, PluginCall)
                else encode_reply(message))
    again = reader.next_frame()
    assert again is not None, f"{message!r}: encoded frame is not whole"
    parsed = parse_call(again) if isinstance(message, PluginCall) else parse_reply(again)
    assert parsed == message, f"{message!r} did not survive encode/decode"


def one_input(data: bytes) -> None:
    for frame in _frames(data):
        for parse in (parse_call, parse_reply):
            try:
                message: PluginCall | PluginReply = parse(frame)
            except ProtocolError:
                continue
            _round_trip(message)
