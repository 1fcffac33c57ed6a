"""The agent → proxy control protocol, sans-IO: messages, their encoding, and the
proxy's bookkeeping for a reconnecting agent.

The node agent and the node proxy are separate processes so that either can
restart without taking the other down: while the agent is gone the proxy keeps
every pod's listeners and connections, and the pods' redirection (iptables
rules or pinned eBPF programs) keeps sending traffic to them. This is the same
split as istio-cni and ztunnel, and the same shape as their ZDS protocol:

- the agent connects on a unix ``SOCK_SEQPACKET`` socket (one message per record,
  so no framing of our own) and says ``hello``;
- ``add_pod`` carries the workload and, as ``SCM_RIGHTS`` ancillary data, an open
  fd of the pod's network namespace, so the proxy needs no access to the host's
  /proc or /run/netns and cannot be pointed at the wrong namespace by a path race;
- ``remove_pod`` names a uid;
- ``snapshot_sent`` ends a reconnecting agent's replay: pods the proxy serves that
  the replay did not name were removed while the agent was away, and go.

Every request gets one ``ack``, with ``error`` set when it failed. Messages are
small JSON objects; a malformed one is refused by name and field, and the
connection is kept.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from identity.spiffe import Identity, InvalidIdentity
from tunnel.state import Workload

PROTOCOL_VERSION = 1
# Far above any real message (a workload with many labels is a few KiB), and
# small enough that a runaway sender cannot make the proxy allocate much.
MAX_MESSAGE = 64 * 1024


class ControlError(ValueError):
    """A control message that cannot be used; the text names the message and field."""


@dataclass(frozen=True, slots=True)
class Hello:
    node: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class AddPod:
    workload: Workload
    netns: str  # the path the agent opened, for log lines only: the fd is what counts


@dataclass(frozen=True, slots=True)
class RemovePod:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    error: str = ""


Request = Hello | AddPod | RemovePod | SnapshotSent
Message = Request | Ack


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    match message:
        case Hello(node, version):
            body = {"type": "hello", "node": node, "version": version}
        case AddPod(workload, netns):
            body = {"type": "add_pod", "workload": workload_to_json(workload), "netns": netns}
        case RemovePod(uid):
            body = {"type": "remove_pod", "uid": uid}
        case SnapshotSent():
            body = {"type": "snapshot_sent"}
        case Ack(error):
            body = {"type": "ack", "error": error} if error else {"type": "ack"}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ControlError(f"{body['type']}: message of {len(data)} bytes is over "
                           f"the limit of {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # ValueError: bad UTF-8 or JSON, and an integer longer than Python converts
        # (4300 digits); RecursionError: nesting deeper than the stack.
        raise ControlError(f"control message: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ControlError("control message: not a JSON object")
    kind = body.get("type")
    match kind:
        case "hello":
            version = _field(body, "hello", "version", int)
            if version != PROTOCOL_VERSION:
                raise ControlError(f"hello.version: {version} is not the supported "
                                   f"version {PROTOCOL_VERSION}")
            return Hello(_field(body, "hello", "node", str), version)
        case "add_pod":
            raw = _field(body, "add_pod", "workload", dict)
            return AddPod(workload_from_json(raw), _field(body, "add_pod", "netns", str))
        case "remove_pod":
            return RemovePod(_field(body, "remove_pod", "uid", str))
        case "snapshot_sent":
            return SnapshotSent()
        case "ack":
            error = body.get("error", "")
            if not isinstance(error, str):
                raise ControlError("ack.error: not a string")
            return Ack(error)
    raise ControlError(f"control message: type {kind!r} is not one of hello, add_pod, "
                       "remove_pod, snapshot_sent, ack")


_WORKLOAD_STRINGS = ("uid", "name", "namespace", "node", "ip", "service_account",
                     "trust_domain", "netns", "cgroup")


def workload_to_json(workload: Workload) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(workload, name) for name in _WORKLOAD_STRINGS}
    body["labels"] = dict(workload.labels)
    body["enrolled"] = workload.enrolled
    return body


def workload_from_json(body: Mapping[str, Any]) -> Workload:
    values = {name: _field(body, "add_pod.workload", name, str) for name in _WORKLOAD_STRINGS}
    if not values["uid"]:
        raise ControlError("add_pod.workload.uid: empty")
    try:
        ipaddress.IPv4Address(values["ip"])
    except ValueError:
        raise ControlError(f"add_pod.workload.ip: {values['ip']!r} is not an IPv4 address"
                           ) from None
    _check_identity(values)
    labels = _field(body, "add_pod.workload", "labels", dict)
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ControlError(f"add_pod.workload.labels[{key!r}]: not a string")
    return Workload(labels=MappingProxyType(dict(labels)),
                    enrolled=_field(body, "add_pod.workload", "enrolled", bool), **values)


def _check_identity(values: Mapping[str, str]) -> None:
    """The proxy asks for the pod's certificate by its identity: refuse, by field, a
    name that no SPIFFE ID can hold (the agent's sources refuse them too)."""
    domain, namespace = values["trust_domain"], values["namespace"]
    for name, parts in (("trust_domain", ("default", "default", domain)),
                        ("namespace", (namespace, "default", domain)),
                        ("service_account", (namespace, values["service_account"], domain))):
        try:
            Identity.of(*parts)
        except InvalidIdentity:
            raise ControlError(f"add_pod.workload.{name}: {values[name]!r} is not valid in "
                               "a SPIFFE ID") from None


def _field(body: Mapping[str, Any], where: str, name: str, kind: type) -> Any:
    if name not in body:
        raise ControlError(f"{where}.{name}: missing")
    value = body[name]
    # bool is an int to Python; a version of True is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ControlError(f"{where}.{name}: {value!r} is not a {kind.__name__}")
    return value


class Replay:
    """The proxy's record of one agent connection, for ``snapshot_sent``.

    A pod the agent added (or kept) since it said hello is current; when the
    agent says its replay is complete, every other served pod is stale. Until
    then nothing is removed, so an agent that dies mid-replay costs nothing.
    """

    def __init__(self) -> None:
        self._named: set[str] = set()
        self.complete = False

    def named(self, uid: str) -> None:
        self._named.add(uid)

    def forgotten(self, uid: str) -> None:
        self._named.discard(uid)

    def stale(self, served: Iterable[str]) -> list[str]:
        self.complete = True
        return sorted(set(served) - self._named)
