"""Plugin ↔ agent messages over a unix stream socket, sans-IO.

The plugin on the host (``plugin/trellis_cni.c``) is a forwarder: it hands the
agent the CNI call exactly as the runtime made it, and prints the agent's
answer. All parsing and deciding happens here, in Python, once.

A frame is a 4-byte big-endian length and that many bytes. One connection
carries one call and its one reply.

- Call: ``trellis-cni/2\\0``, then each forwarded environment variable as
  ``NAME=VALUE\\0``, then an empty one (``\\0``), then the configuration bytes
  the runtime wrote on the plugin's stdin, unparsed.
- Reply: one byte, the plugin's exit code, then the bytes it prints on stdout.

Binary on purpose: the C side builds and reads it with ``memcpy`` and needs no
JSON writer; the JSON it carries (stdin, the result) is parsed by ``spec.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

MAX_FRAME = 1 << 20  # a CNI configuration is a few KiB; the plugin refuses more too
MAGIC = b"trellis-cni/2\x00"
_HEADER = struct.Struct(">I")
# What the plugin forwards of its environment: the CNI variables, nothing else.
FORWARDED_ENV = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS",
                 "CNI_PATH")


class ProtocolError(ValueError):
    """The peer sent something that is not a valid frame or message."""


@dataclass(frozen=True, slots=True)
class PluginCall:
    """One CNI invocation as the runtime made it: its environment and its stdin."""

    env: Mapping[str, str]
    stdin: bytes


@dataclass(frozen=True, slots=True)
class PluginReply:
    """What the plugin prints and exits with."""

    exit_code: int
    stdout: bytes


@dataclass(frozen=True, slots=True)
class PodRequest:
    """What one call asks of the agent, once ``spec.py`` has read it."""

    op: str  # "add" | "del" | "check"
    container_id: str
    netns: str = ""
    pod_ip: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""

    @property
    def key(self) -> str:
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else self.container_id


@dataclass(frozen=True, slots=True)
class PodResponse:
    ok: bool
    error: str = ""
    retry: bool = False  # the plugin answers "try again later" (CNI code 11)


def _frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def encode_call(call: PluginCall) -> bytes:
    """The plugin's side, for tests and tools (the real plugin is C)."""
    env = b"".join(f"{name}={call.env[name]}".encode() + b"\x00"
                   for name in FORWARDED_ENV if name in call.env)
    return _frame(MAGIC + env + b"\x00" + call.stdin)


def parse_call(body: bytes) -> PluginCall:
    if not body.startswith(MAGIC):
        raise ProtocolError("not a trellis-cni/2 call (an older or foreign plugin?)")
    env: dict[str, str] = {}
    at = len(MAGIC)
    while True:
        end = body.find(b"\x00", at)
        if end < 0:
            raise ProtocolError("environment: not terminated")
        if end == at:
            return PluginCall(env, body[end + 1:])
        try:
            name, sep, value = body[at:end].decode().partition("=")
        except UnicodeDecodeError:
            raise ProtocolError("environment: not UTF-8") from None
        if not sep or name not in FORWARDED_ENV:
            raise ProtocolError(f"environment: {name!r} is not a forwarded CNI variable")
        if name in env:
            raise ProtocolError(f"environment: {name} twice")
        env[name] = value
        at = end + 1


def encode_reply(reply: PluginReply) -> bytes:
    if not 0 <= reply.exit_code <= 255:
        raise ProtocolError(f"exit code {reply.exit_code} is not a byte")
    return _frame(bytes([reply.exit_code]) + reply.stdout)


def parse_reply(body: bytes) -> PluginReply:
    if not body:
        raise ProtocolError("reply: empty")
    return PluginReply(body[0], body[1:])


class FrameReader:
    """Feed bytes as they arrive; ``next_frame`` returns one frame's body once whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        if len(self._buffer) < _HEADER.size + length:
            return None
        body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        return body
