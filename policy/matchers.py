"""Value matchers for AuthorizationPolicy fields: strings, IP blocks and ports.

Istio, on every string field of a rule:

    "Exact match: `abc` will match on value `abc`. Prefix match: `abc*` will match
    on value `abc` and `abcd`. Suffix match: `*abc` will match on value `abc` and
    `xabc`. Presence match: `*` will match when value is not empty."

A leading ``*`` is read before a trailing one, so ``*abc*`` is a suffix match on
``abc*``, and a ``*`` in the middle (``a*b``) is an exact match, as istiod
converts them for ztunnel. An absent value (a plaintext peer has no principal)
never matches, not even ``*``.

IP blocks are a single address or a CIDR; as with Go's ``netip.ParsePrefix``,
host bits after the prefix are allowed (``10.0.0.1/8`` is ``10.0.0.0/8``).
Ports are strings of decimal digits, 0-65535.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_PORT = 65535


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringPattern:
    """One value of a string field, e.g. ``cluster.local/ns/demo/*``."""

    kind: MatchKind
    text: str  # the part to compare: without the ``*``

    @classmethod
    def parse(cls, value: str) -> StringPattern:
        if value == "*":
            return cls(MatchKind.PRESENCE, "")
        if value.startswith("*"):
            return cls(MatchKind.SUFFIX, value[1:])
        if value.endswith("*"):
            return cls(MatchKind.PREFIX, value[:-1])
        return cls(MatchKind.EXACT, value)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        kind = self.kind
        if kind is MatchKind.EXACT:
            return value == self.text
        if kind is MatchKind.PREFIX:
            return value.startswith(self.text)
        if kind is MatchKind.SUFFIX:
            return value.endswith(self.text)
        return value != ""

    def __str__(self) -> str:
        if self.kind is MatchKind.PRESENCE:
            return "*"
        if self.kind is MatchKind.PREFIX:
            return self.text + "*"
        if self.kind is MatchKind.SUFFIX:
            return "*" + self.text
        return self.text


def parse_address(text: str) -> IPAddress:
    """An address as a connection reports it; IPv4-mapped IPv6 becomes IPv4.

    A dual-stack socket reports an IPv4 peer as ``::ffff:a.b.c.d``; the policy
    says ``a.b.c.d``, and must match it all the same.
    """
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_ip_block(text: str) -> IPNetwork | None:
    """``203.0.113.4`` or ``203.0.113.0/24`` (or IPv6); None when it is neither.

    A single address is the block of just that address (/32 or /128).
    """
    if text != text.strip() or "%" in text:
        return None  # no padding, and no IPv6 zone: neither is a block
    address, slash, bits = text.partition("/")
    # Only a prefix length, as Go reads it: ipaddress would also take a netmask
    # ("/255.0.0.0") or a length with leading zeros ("/08").
    if slash and not (bits.isascii() and bits.isdigit() and (bits == "0" or bits[0] != "0")):
        return None
    try:
        if slash:
            return ipaddress.ip_network(text, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(address))
    except ValueError:
        return None


def parse_port(text: str) -> int | None:
    """``"8080"`` → 8080; None unless it is plain decimal digits within 0-65535.

    ``int()`` alone would also take ``" 80"``, ``"+80"`` and ``"8_0"``; Istio
    (``strconv.ParseUint``) takes none of them.
    """
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if port <= MAX_PORT else None
