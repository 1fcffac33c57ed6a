"""The CNI execution protocol (spec 1.0.0), sans-IO: environment + stdin in, stdout + exit out.

What the spec asks of a chained plugin, and where it is handled:

- ``VERSION``: print the versions we speak; stdin carries only ``cniVersion``.
- ``ADD``: the config carries ``prevResult`` (the interface plugin's result); a
  chained plugin that changes nothing prints it back, with the config's
  ``cniVersion``. We change nothing: we only install redirection in the pod.
- ``DEL``: must succeed when there is nothing left to delete (it may be called
  twice, or for a container whose namespace is gone; ``CNI_NETNS`` may be empty).
- ``CHECK``: print nothing on success, an error otherwise; ``prevResult`` is
  required; not defined before 0.4.0.
- Errors: a JSON object ``{"cniVersion", "code", "msg", "details"}`` on stdout
  and a non-zero exit. Codes 1-99 are the spec's; we use them where they fit.

Nothing here touches a socket or the environment itself: the agent's CNI server
(``nodeagent/cni_server.py``) runs it on the call the C plugin forwarded.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_SINCE = ("0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
DEFAULT_SOCKET = "/var/run/trellis/cni.sock"
DEFAULT_TIMEOUT_S = 30.0

# The spec's well-known error codes (1-99 are reserved for it).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11


class CniError(Exception):
    """One failure, as the runtime will see it: a spec code, a message, details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True, slots=True)
class Output:
    """What the plugin prints on stdout and exits with."""

    stdout: str
    exit_code: int


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """Our own fields in the plugin's entry of the network configuration list."""

    agent_socket: str = DEFAULT_SOCKET
    timeout_s: float = DEFAULT_TIMEOUT_S
    # Pods here are never ours: the plugin lets them through without asking the
    # agent (kube-system, and Trellis's own namespace, whose agent pod must never
    # wait for an agent). The installer writes the list (chart: cni.excludeNamespaces).
    exclude_namespaces: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Invocation:
    command: str
    cni_version: str
    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]
    plugin: PluginConfig
    prev_result: Mapping[str, Any] | None = None
    raw_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")

    @property
    def pod_uid(self) -> str:
        return self.args.get("K8S_POD_UID", "")


def parse_cni_args(value: str) -> dict[str, str]:
    """``CNI_ARGS`` is ``K=V;K=V`` (the spec's only structure for it)."""
    out: dict[str, str] = {}
    for part in filter(None, value.split(";")):
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {part!r} is not KEY=VALUE")
        out[key] = val
    return out


def _decode_config(stdin: bytes) -> dict[str, Any]:
    try:
        config = json.loads(stdin.decode("utf-8") or "null")
    # ValueError: bad UTF-8 or JSON, and an integer longer than Python converts (4300
    # digits); RecursionError: nesting deeper than the stack.
    except (ValueError, RecursionError) as exc:
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not JSON",
                       str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not a JSON object")
    return config


def _version_of(config: Mapping[str, Any]) -> str:
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "cniVersion: missing from the network configuration")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion: {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def _plugin_config(config: Mapping[str, Any]) -> PluginConfig:
    socket_path = config.get("agentSocket", DEFAULT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise CniError(INVALID_CONFIG, f"agentSocket: {socket_path!r} is not an absolute path")
    timeout = config.get("timeoutSeconds", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise CniError(INVALID_CONFIG, f"timeoutSeconds: {timeout!r} is not a positive number")
    excluded = config.get("excludeNamespaces", [])
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise CniError(INVALID_CONFIG, f"excludeNamespaces: {excluded!r} is not a list of "
                                       "namespace names")
    return PluginConfig(agent_socket=socket_path, timeout_s=float(timeout),
                        exclude_namespaces=frozenset(excluded))


def _env(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CniError(INVALID_ENVIRONMENT, f"{name}: not set")
    return value


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Validate everything the runtime handed us; raise ``CniError`` naming what is wrong."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND: {command!r} is not one of "
                                            f"{', '.join(COMMANDS)}")
    if command == "VERSION":
        # Answered whatever version was asked: telling the runtime what we speak is
        # the point. An empty stdin is tolerated the same way.
        asked = _decode_config(stdin) if stdin.strip() else {}
        version = asked.get("cniVersion") if isinstance(asked.get("cniVersion"), str) else ""
        return Invocation(command, version or "1.0.0", "", "", "", {}, PluginConfig(), None,
                          asked)
    config = _decode_config(stdin)
    version = _version_of(config)
    container_id = _env(env, "CNI_CONTAINERID")
    ifname = _env(env, "CNI_IFNAME")
    _env(env, "CNI_PATH")  # required by the spec even though we call no other plugin
    # DEL may come after the namespace is gone, with CNI_NETNS unset.
    netns = env.get("CNI_NETNS", "") if command == "DEL" else _env(env, "CNI_NETNS")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "prevResult: not a JSON object")
    if command == "CHECK" and version not in CHECK_SINCE:
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK is not defined for cniVersion {version}")
    if command in ("ADD", "CHECK") and prev is None:
        raise CniError(INVALID_CONFIG, "prevResult: missing; trellis-cni must be chained "
                                       "after the interface plugin")
    return Invocation(command, version, container_id, netns, ifname, args,
                      _plugin_config(config), prev, config)


def passes_without_agent(invocation: Invocation) -> str | None:
    """Why this call is let through without the agent's view (the C plugin makes the
    same check before it dials the agent), or ``None`` if the agent must decide."""
    if not invocation.pod_namespace:
        return "not a Kubernetes pod (no K8S_POD_NAMESPACE in CNI_ARGS)"
    if invocation.pod_namespace in invocation.plugin.exclude_namespaces:
        return f"namespace {invocation.pod_namespace!r} is excluded (excludeNamespaces)"
    return None


def pod_ip(invocation: Invocation) -> str:
    """The pod's IPv4 address from ``prevResult``: prefer an address on an interface
    inside the sandbox (one with ``sandbox`` set), else the first IPv4 one."""
    prev = invocation.prev_result or {}
    interfaces = _list_of(prev, "interfaces")
    candidates: list[tuple[bool, str]] = []
    for entry in _list_of(prev, "ips"):
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            continue
        try:
            iface = ipaddress.ip_interface(entry["address"])
        except ValueError:
            raise CniError(INVALID_CONFIG, f"prevResult.ips: {entry['address']!r} is not an "
                                           f"address/prefix") from None
        if iface.version != 4:
            continue
        index = entry.get("interface")
        in_sandbox = False
        if isinstance(index, int) and 0 <= index < len(interfaces):
            interface = interfaces[index] or {}
            if not isinstance(interface, dict):
                raise CniError(INVALID_CONFIG, f"prevResult.interfaces[{index}]: not an object")
            in_sandbox = bool(interface.get("sandbox"))
        candidates.append((in_sandbox, str(iface.ip)))
    if not candidates:
        raise CniError(INVALID_CONFIG, "prevResult.ips: no IPv4 address for the pod")
    return sorted(candidates, key=lambda c: not c[0])[0][1]


def _list_of(prev: Mapping[str, Any], name: str) -> list[Any]:
    value = prev.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CniError(INVALID_CONFIG, f"prevResult.{name}: not a list")
    return value


def version_output(cni_version: str = "1.0.0") -> Output:
    body = {"cniVersion": cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    return Output(json.dumps(body), 0)


def add_output(invocation: Invocation) -> Output:
    """The chained result: ``prevResult`` passed through, in the config's version."""
    result = dict(invocation.prev_result or {})
    result["cniVersion"] = invocation.cni_version
    return Output(json.dumps(result), 0)


def error_output(error: CniError, cni_version: str = "1.0.0") -> Output:
    body = {"cniVersion": cni_version, "code": error.code, "msg": error.msg,
            "details": error.details}
    return Output(json.dumps(body), 1)


def success_output(invocation: Invocation) -> Output:
    """What a successful command prints: the result for ADD, nothing for DEL/CHECK."""
    if invocation.command == "ADD":
        return add_output(invocation)
    if invocation.command == "VERSION":
        return version_output(invocation.cni_version)
    return Output("", 0)
