"""The SPIFFE identity of a workload: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

This module is the one place an identity is parsed or printed, so every other
module compares typed values instead of strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TRUST_DOMAIN = "cluster.local"

# Kubernetes names (RFC 1123 labels for namespaces and service accounts) and
# DNS-like trust domains; anything else cannot come from a real cluster.
_LABEL = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_PATH = re.compile(rf"^/ns/(?P<ns>{_LABEL})/sa/(?P<sa>{_LABEL})$")


class InvalidIdentity(ValueError):
    """A string that is not a workload SPIFFE ID; the message says which part is wrong."""


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, uri: str) -> Identity:
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme != "spiffe":
            raise InvalidIdentity(f"{uri!r}: a SPIFFE ID starts with 'spiffe://'")
        domain, slash, path = rest.partition("/")
        # fullmatch: `$` alone also matches before a final newline.
        if not _TRUST_DOMAIN.fullmatch(domain):
            raise InvalidIdentity(f"{uri!r}: {domain!r} is not a valid trust domain")
        match = _PATH.fullmatch(slash + path)
        if match is None:
            raise InvalidIdentity(f"{uri!r}: the path must be /ns/<namespace>/sa/<service-account>")
        return cls(domain, match["ns"], match["sa"])

    @classmethod
    def of(cls, namespace: str, service_account: str,
           trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's principal form: the SPIFFE ID without its scheme."""
        return self.uri.removeprefix("spiffe://")

    def __str__(self) -> str:
        return self.uri
