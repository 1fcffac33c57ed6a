"""The AuthorizationPolicy schema's rule fields, and their values as matchers.

Field names and the checks on their values follow Istio's API and its
validation (``pkg/config/validation``): empty strings are rejected everywhere,
IP blocks must parse, ports are decimal 0-65535, serviceAccounts are exact
``ns/sa`` or ``sa``, trust domains allow one ``*`` at an end and no ``/``.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from policy.matchers import IPNetwork, StringPattern, parse_ip_block, parse_port
from policy.model import (
    Field,
    IpAttribute,
    IpValues,
    PortValues,
    ServiceAccountValues,
    TextAttribute,
    TextValues,
    Values,
)
from policy.schema import Reader, child, item

RULE = ("from", "to", "when")
CONDITION = ("key", "values", "notValues")

# (positive, negative) pairs enforced at L4, in the order they are checked.
SOURCE_PAIRS = (("principals", "notPrincipals"), ("namespaces", "notNamespaces"),
                ("serviceAccounts", "notServiceAccounts"), ("trustDomains", "notTrustDomains"),
                ("ipBlocks", "notIpBlocks"))
SOURCE_HTTP = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
SOURCE_FIELDS = frozenset(name for pair in SOURCE_PAIRS for name in pair) | frozenset(SOURCE_HTTP)
SERVICE_ACCOUNT_FIELDS = frozenset(("serviceAccounts", "notServiceAccounts"))
PRINCIPAL_FIELDS = frozenset(("principals", "notPrincipals", "namespaces", "notNamespaces"))

OPERATION_HTTP = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
OPERATION_FIELDS = frozenset(("ports", "notPorts", *OPERATION_HTTP))

# What each L4 field holds; a `when` key maps to the same kinds.
_KIND = MappingProxyType({
    "principals": "principal", "notPrincipals": "principal",
    "namespaces": "namespace", "notNamespaces": "namespace",
    "trustDomains": "trustDomain", "notTrustDomains": "trustDomain",
    "serviceAccounts": "serviceAccount", "notServiceAccounts": "serviceAccount",
    "ipBlocks": "sourceIp", "notIpBlocks": "sourceIp",
    "ports": "port", "notPorts": "port",
})
L4_CONDITIONS = MappingProxyType({
    "source.principal": "principal", "source.namespace": "namespace", "source.ip": "sourceIp",
    "destination.ip": "destinationIp", "destination.port": "port",
})
HTTP_CONDITION = "http"

# Istio's attributes that only a proxy reading HTTP (or the waypoint) can see.
_HTTP_KEYS = frozenset(("remote.ip", "source.serviceAccount", "source.trustDomain",
                        "request.auth.principal", "request.auth.audiences",
                        "request.auth.presenter", "connection.sni"))
_HTTP_MAP_KEYS = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
_MAP_KEY = re.compile(r"^[^\[\]]+\[.+\]$")
_REJECTED_KEYS = MappingProxyType({
    "destination.namespace": "is replaced by metadata.namespace",
    "destination.name": "is deprecated (only supported in v1alpha1)",
    "destination.user": "is deprecated (only supported in v1alpha1)",
})


def build_field(reader: Reader, path: str, key: str, not_key: str,
                present: dict[str, tuple[str, ...]], namespace: str) -> Field | None:
    """The Field for one (positive, negative) pair, or None if neither is set."""
    kind = _KIND[key]
    values = _values(reader, child(path, key), kind, present.get(key, ()), namespace)
    not_values = _values(reader, child(path, not_key), kind, present.get(not_key, ()), namespace)
    if values is None and not_values is None:
        return None
    return Field(values, not_values)


def build_condition_field(reader: Reader, path: str, kind: str,
                          present: dict[str, tuple[str, ...]]) -> Field | None:
    values = _values(reader, child(path, "values"), kind, present["values"], "")
    not_values = _values(reader, child(path, "notValues"), kind, present["notValues"], "")
    if values is None and not_values is None:
        return None
    return Field(values, not_values)


def condition_kind(reader: Reader, path: str, key: str) -> str | None:
    """The kind of a `when` key: an L4 kind, HTTP_CONDITION, or None (error)."""
    if key in L4_CONDITIONS:
        return L4_CONDITIONS[key]
    if key in _HTTP_KEYS:
        return HTTP_CONDITION
    if key.startswith(_HTTP_MAP_KEYS):
        if _MAP_KEY.fullmatch(key):
            return HTTP_CONDITION
        reader.error(path, f"bad key {key!r}: should have the form name[entry]")
        return None
    if key.startswith("destination.labels"):
        reader.error(path, f"{key!r} is replaced by the workload selector")
    elif key in _REJECTED_KEYS:
        reader.error(path, f"{key!r} {_REJECTED_KEYS[key]}")
    else:
        reader.error(path, f"unknown attribute {key!r}")
    return None


def check_http_values(reader: Reader, path: str, key: str, values: tuple[str, ...]) -> None:
    """HTTP fields are not enforced, but a malformed one is still an error."""
    if key in ("remoteIpBlocks", "notRemoteIpBlocks"):
        _ip_blocks(reader, path, values)


def check_http_condition(reader: Reader, path: str, key: str, values: tuple[str, ...],
                         not_values: tuple[str, ...]) -> None:
    for name, entries in (("values", values), ("notValues", not_values)):
        if key == "remote.ip":
            _ip_blocks(reader, child(path, name), entries)
        elif key == "source.serviceAccount":
            _service_accounts(reader, child(path, name), entries, "")


def _values(reader: Reader, path: str, kind: str, values: tuple[str, ...],
            namespace: str) -> Values | None:
    if not values:
        return None
    if kind in ("principal", "namespace", "trustDomain"):
        if kind == "trustDomain":
            _check_trust_domains(reader, path, values)
        text = {"principal": TextAttribute.PRINCIPAL, "namespace": TextAttribute.NAMESPACE,
                "trustDomain": TextAttribute.TRUST_DOMAIN}[kind]
        return TextValues(text, tuple(StringPattern.parse(v) for v in values))
    if kind == "serviceAccount":
        return ServiceAccountValues(_service_accounts(reader, path, values, namespace))
    if kind == "port":
        return PortValues(_ports(reader, path, values))
    ip = IpAttribute.SOURCE if kind == "sourceIp" else IpAttribute.DESTINATION
    return IpValues(ip, _ip_blocks(reader, path, values))


def _ip_blocks(reader: Reader, path: str, values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    blocks: list[IPNetwork] = []
    for index, value in enumerate(values):
        block = parse_ip_block(value)
        if block is None:
            what = "a CIDR" if "/" in value else "an IP address or CIDR"
            reader.error(item(path, index), f"{value!r} is not {what}")
        else:
            blocks.append(block)
    return tuple(blocks)


def _ports(reader: Reader, path: str, values: tuple[str, ...]) -> frozenset[int]:
    ports: set[int] = set()
    for index, value in enumerate(values):
        port = parse_port(value)
        if port is None:
            reader.error(item(path, index), f"{value!r} is not a port (a number 0-65535)")
        else:
            ports.add(port)
    return frozenset(ports)


def _service_accounts(reader: Reader, path: str, values: tuple[str, ...],
                      namespace: str) -> frozenset[tuple[str, str]]:
    """Istio: "This takes the format `<namespace>/<serviceaccount>`.
    `<serviceaccount>` may also be used to use the same namespace as the
    `AuthorizationPolicy`. No form of wildcard (`*`) is allowed."
    """
    if len(values) > 16:
        reader.error(path, "at most 16 service accounts are allowed")
    accounts: set[tuple[str, str]] = set()
    for index, value in enumerate(values):
        ns, slash, name = value.rpartition("/")
        if "*" in value:
            reader.error(item(path, index), f"{value!r}: wildcards are not allowed here")
        elif value.count("/") > 1 or (slash and not (ns and name)) or len(value) > 320:
            reader.error(item(path, index),
                         f"{value!r} is not 'namespace/serviceAccount' or 'serviceAccount'")
        else:
            accounts.add((ns if slash else namespace, name))
    return frozenset(accounts)


def _check_trust_domains(reader: Reader, path: str, values: tuple[str, ...]) -> None:
    for index, value in enumerate(values):
        stars = value.count("*")
        ends = value.startswith("*") or value.endswith("*")
        if "/" in value:
            reader.error(item(path, index), f"{value!r}: a trust domain has no '/'")
        elif stars > 1 or (stars == 1 and not ends):
            reader.error(item(path, index), f"{value!r}: one '*' is allowed, at the start or end")
