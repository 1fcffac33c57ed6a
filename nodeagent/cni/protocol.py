"""Plugin ↔ agent messages over a unix stream socket, sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
One connection carries one request and its one response, so neither side needs
ids or pipelining; the plugin is a short-lived process anyway.

Request: ``{"op": "add"|"del"|"check", "container_id", "netns", "pod_ip",
"pod_namespace", "pod_name", "pod_uid"}``. Response: ``{"ok": bool, "error": str,
"retry": bool}``; ``retry`` tells the plugin to answer "try again later" (CNI code
11) rather than a hard failure, e.g. while the agent has not synced yet.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Any

MAX_FRAME = 64 * 1024  # a request is a few hundred bytes; refuse anything absurd
_HEADER = struct.Struct(">I")
OPS = ("add", "del", "check")


class ProtocolError(ValueError):
    """The peer sent something that is not a valid frame or message."""


@dataclass(frozen=True, slots=True)
class PodRequest:
    op: str
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
    retry: bool = False


def encode(message: PodRequest | PodResponse) -> bytes:
    body = json.dumps(asdict(message), separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Feed bytes as they arrive; ``next_frame`` returns a decoded object once whole."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> dict[str, Any] | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        if len(self._buffer) < _HEADER.size + length:
            return None
        body = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
        del self._buffer[:_HEADER.size + length]
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"frame is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ProtocolError("frame is not a JSON object")
        return value


def _strings(value: dict[str, Any], names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        item = value.get(name, "")
        if not isinstance(item, str):
            raise ProtocolError(f"{name}: not a string")
        out[name] = item
    return out


def parse_request(value: dict[str, Any]) -> PodRequest:
    fields = _strings(value, ("op", "container_id", "netns", "pod_ip", "pod_namespace",
                              "pod_name", "pod_uid"))
    if fields["op"] not in OPS:
        raise ProtocolError(f"op: {fields['op']!r} is not one of {', '.join(OPS)}")
    if not fields["container_id"]:
        raise ProtocolError("container_id: empty")
    return PodRequest(**fields)


def parse_response(value: dict[str, Any]) -> PodResponse:
    ok, retry = value.get("ok"), value.get("retry", False)
    if not isinstance(ok, bool) or not isinstance(retry, bool):
        raise ProtocolError("ok/retry: not booleans")
    (error,) = _strings(value, ("error",)).values()
    return PodResponse(ok=ok, error=error, retry=retry)
