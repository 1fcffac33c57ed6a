"""A loaded AuthorizationPolicy, reduced to what can be decided at L4.

The shape follows Istio's rule semantics:

    "A match occurs when at least one source, one operation and all conditions
    matches the request. An empty rule is always matched."

    "Fields in the source are ANDed together." (and so are an operation's)

So a `Rule` is an AND of clauses; a clause (all of ``from``, or all of ``to``,
or one ``when`` condition) is an OR of `Match`es; a `Match` is an AND of
`Field`s; a `Field` matches when any of its values does and none of its
``not`` values does. A rule without clauses matches every connection, and so
does a `Match` without fields (only fail-closed DENY handling makes one: see
``policy/compile.py``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from policy.matchers import IPAddress, IPNetwork, StringPattern


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class TextAttribute(enum.Enum):
    """The string attributes of a peer, all read from its certificate."""

    PRINCIPAL = "source.principal"
    NAMESPACE = "source.namespace"
    TRUST_DOMAIN = "source.trustDomain"


class IpAttribute(enum.Enum):
    SOURCE = "source.ip"
    DESTINATION = "destination.ip"


@dataclass(frozen=True, slots=True)
class Peer:
    """What a connection offers to the rules, prepared once per decision.

    ``principal`` is the SPIFFE ID without ``spiffe://`` (Istio's form);
    ``namespace``, ``service_account`` and ``trust_domain`` are parsed from it.
    A plaintext peer has none of them.
    """

    principal: str | None
    namespace: str | None
    service_account: str | None
    trust_domain: str | None
    source_ip: IPAddress
    dest_ip: IPAddress
    dest_port: int

    def text(self, attribute: TextAttribute) -> str | None:
        if attribute is TextAttribute.PRINCIPAL:
            return self.principal
        if attribute is TextAttribute.NAMESPACE:
            return self.namespace
        return self.trust_domain


@dataclass(frozen=True, slots=True)
class TextValues:
    attribute: TextAttribute
    patterns: tuple[StringPattern, ...]

    def any_match(self, peer: Peer) -> bool:
        value = peer.text(self.attribute)
        return any(pattern.matches(value) for pattern in self.patterns)


@dataclass(frozen=True, slots=True)
class ServiceAccountValues:
    """``namespace/name`` pairs, exact: Istio allows no wildcard here."""

    accounts: frozenset[tuple[str, str]]

    def any_match(self, peer: Peer) -> bool:
        if peer.namespace is None or peer.service_account is None:
            return False
        return (peer.namespace, peer.service_account) in self.accounts


@dataclass(frozen=True, slots=True)
class IpValues:
    attribute: IpAttribute
    blocks: tuple[IPNetwork, ...]

    def any_match(self, peer: Peer) -> bool:
        address = peer.source_ip if self.attribute is IpAttribute.SOURCE else peer.dest_ip
        return any(address in block for block in self.blocks)


@dataclass(frozen=True, slots=True)
class PortValues:
    ports: frozenset[int]

    def any_match(self, peer: Peer) -> bool:
        return peer.dest_port in self.ports


Values = TextValues | ServiceAccountValues | IpValues | PortValues


@dataclass(frozen=True, slots=True)
class Field:
    """``principals`` with ``notPrincipals``, or ``values`` with ``notValues``."""

    values: Values | None
    not_values: Values | None

    def matches(self, peer: Peer) -> bool:
        if self.values is not None and not self.values.any_match(peer):
            return False
        return self.not_values is None or not self.not_values.any_match(peer)


@dataclass(frozen=True, slots=True)
class Match:
    """One source, one operation or one condition: every field must match."""

    fields: tuple[Field, ...]

    def matches(self, peer: Peer) -> bool:
        return all(f.matches(peer) for f in self.fields)


Clause = tuple[Match, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    index: int  # the rule's position in the policy's `rules` as written
    clauses: tuple[Clause, ...]

    def matches(self, peer: Peer) -> bool:
        return all(any(m.matches(peer) for m in clause) for clause in self.clauses)


@dataclass(frozen=True, slots=True)
class Policy:
    """One enforceable policy.

    ``selector`` is None when the policy applies to its whole namespace;
    ``mesh_wide`` is set for a policy in the root namespace, which applies in
    every namespace (with its selector, to the matching workloads of every
    namespace). ``fail_closed`` marks the stand-in for a policy that has never
    been valid (``policy/failclosed.py``): an ALLOW without rules, or a DENY
    whose one rule matches everything; decisions it makes say so.
    """

    namespace: str
    name: str
    action: Action
    rules: tuple[Rule, ...]
    selector: tuple[tuple[str, str], ...] | None = None
    mesh_wide: bool = False
    fail_closed: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: Mapping[str, str]) -> bool:
        """The selector's labels are a subset of the workload's."""
        if self.selector is None:
            return True
        return all(labels.get(k) == v for k, v in self.selector)

    def applies_to(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return (self.mesh_wide or self.namespace == namespace) and self.selects(labels)

    def first_match(self, peer: Peer) -> int | None:
        """The index (as written) of the first rule that matches, if any.

        Istio: "If not set, the match will never occur": no rules, no match.
        """
        for rule in self.rules:
            if rule.matches(peer):
                return rule.index
        return None


@dataclass(frozen=True, slots=True)
class Problem:
    """An error or warning about one document, printed as
    ``demo/allow-frontend: rules[0].from[0].source.ipBlocks[1]: '10.0.0.300/8' is not a CIDR``.
    """

    policy: str  # "namespace/name", or where the document is when it has no name
    path: str  # the field, relative to `spec` ("" for the document as a whole)
    message: str

    def __str__(self) -> str:
        if self.path:
            return f"{self.policy}: {self.path}: {self.message}"
        return f"{self.policy}: {self.message}"
