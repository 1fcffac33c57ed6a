"""The input and output of one authorization decision.

Where the source namespace comes from: Istio defines ``namespaces`` as "A list
of namespaces derived from the peer certificate. This field requires mTLS
enabled and is the same as the `source.namespace` attribute", and ztunnel
reads it from the peer's SPIFFE ID. So does Trellis: the namespace (and
service account, and trust domain) that rules see is parsed from
``source_principal``. ``ConnectionFacts.source_namespace`` is what the caller
knows of the source workload (from its workload record), kept for logs; it
never decides anything. A plaintext peer has no namespace as far as policy is
concerned, whatever its workload record says: an address is not an identity.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from identity.spiffe import Identity, InvalidIdentity
from policy.matchers import parse_address
from policy.model import Peer

SPIFFE_SCHEME = "spiffe://"


class Reason(enum.StrEnum):
    """Why a connection was allowed or denied; also a metric label value."""

    DENIED_BY_POLICY = "denied_by_policy"  # a DENY policy matched
    NO_POLICY = "no_policy"  # no ALLOW policy applies to the workload: allowed
    ALLOWED_BY_POLICY = "allowed_by_policy"  # an ALLOW policy matched
    NO_ALLOW_MATCH = "no_allow_match"  # ALLOW policies apply, none matched
    # A policy that was never valid applies: its DENY denied, or its ALLOW
    # (which matches nothing) was among those that did not match.
    INVALID_POLICY = "invalid_policy"


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What the inbound side knows about one connection.

    ``source_principal`` is the peer's full SPIFFE URI
    (``spiffe://cluster.local/ns/demo/sa/frontend``), or None for plaintext.
    """

    source_principal: str | None
    source_ip: str
    source_namespace: str | None
    dest_namespace: str
    dest_labels: Mapping[str, str]
    dest_ip: str
    dest_port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """``policy`` is the ``namespace/name`` that decided and ``rule`` the index of
    its matching rule as written; both are None when no single policy decided
    (allowed by default, or denied because no ALLOW policy matched).
    ``audit`` names every AUDIT policy that matched.
    """

    allowed: bool
    policy: str | None
    rule: int | None
    reason: str
    audit: tuple[str, ...] = ()


def peer_of(facts: ConnectionFacts) -> Peer:
    """The attributes rules match on; raises ValueError for a malformed IP.

    ztunnel compares principals without the scheme and fails every principal
    match for an ID that lacks it; a SPIFFE ID that is not a workload identity
    (``/ns/<ns>/sa/<sa>``) still matches by principal and trust domain, never
    by namespace or service account.
    """
    principal = namespace = service_account = trust_domain = None
    uri = facts.source_principal
    if uri is not None and uri.startswith(SPIFFE_SCHEME):
        principal = uri[len(SPIFFE_SCHEME):]
        trust_domain = principal.partition("/")[0] or None
        try:
            identity = Identity.parse(uri)
        except InvalidIdentity:
            pass
        else:
            namespace = identity.namespace
            service_account = identity.service_account
    return Peer(
        principal=principal,
        namespace=namespace,
        service_account=service_account,
        trust_domain=trust_domain,
        source_ip=parse_address(facts.source_ip),
        dest_ip=parse_address(facts.dest_ip),
        dest_port=facts.dest_port,
    )
