"""The mesh CA: a self-signed root and the rules for signing workload certificates.

The CA signs a CSR only when the SPIFFE ID it asks for is in our trust domain
*and* a workload with that identity runs on the authenticated caller's node,
so a compromised node cannot mint identities that live elsewhere (ztunnel's
"node-scoped" CA model). Authenticating the caller is the server's job
(`identity.node_auth`); this module trusts the `node` it is given.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import ca_store, intermediate
from identity.certs import CURVE, CertBundle, generate_key, private_key_pem, utcnow
from identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity, InvalidIdentity

ROOT_LIFETIME = timedelta(days=3650)
DEFAULT_WORKLOAD_LIFETIME = timedelta(hours=24)
# Leaves start a minute in the past so a peer whose clock runs slightly behind
# ours does not reject a certificate we just issued as "not yet valid".
CLOCK_SKEW = timedelta(minutes=1)
CA_SERVER_DNS_NAME = "trellis-ca"


class RefusalKind(enum.Enum):
    """Why a CSR was refused, as the HTTP API needs it: the caller's mistake or policy."""

    MALFORMED = "malformed"  # the CSR itself is wrong: 400
    FORBIDDEN = "forbidden"  # a well-formed request this caller may not make: 403


class SigningRefused(Exception):
    """The CA will not sign this CSR; `reason` is one line naming what is wrong."""

    def __init__(self, reason: str, kind: RefusalKind = RefusalKind.MALFORMED,
                 identity: Identity | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.identity = identity  # what the CSR asked for, when it got that far (for logs)


class WorkloadRegistry(Protocol):
    """Who runs where: the CA's view of scheduling (the lab's topology, later Kubernetes)."""

    def runs_on(self, node: str, identity: Identity) -> bool: ...


@dataclass(frozen=True)
class ServerCredentials:
    """A TLS serving certificate (leaf PEM) and its key, e.g. for the CA's own endpoint."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)


class CertificateAuthority:
    """A signing key and certificate, the roots its leaves chain up to, and the rules.

    Build with `create` (in memory), `load_or_create` (an online root, persisted)
    or `from_plugin` (an intermediate from Istio-style ``cacerts``; the root's key
    stays offline). With an intermediate, every leaf carries ``issuer_chain``
    after it, and peers verify against ``roots`` alone.
    """

    def __init__(self, signing_key: ec.EllipticCurvePrivateKey,
                 signing_cert: x509.Certificate, trust_domain: str,
                 clock: Callable[[], datetime] = utcnow, *,
                 issuer_chain: tuple[x509.Certificate, ...] = (),
                 roots: tuple[x509.Certificate, ...] = ()) -> None:
        self._root_key = signing_key
        self._root_cert = signing_cert
        self._trust_domain = trust_domain
        self._clock = clock
        # The signing certificate is a root itself when no chain is given.
        self._issuer_chain_pem = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in issuer_chain)
        self._roots = tuple(dict.fromkeys(roots or (signing_cert,)))
        self._root_pem = b"".join(r.public_bytes(serialization.Encoding.PEM)
                                  for r in self._roots)

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN,
               clock: Callable[[], datetime] = utcnow) -> CertificateAuthority:
        """A fresh in-memory CA (tests, local tools)."""
        _check_trust_domain(trust_domain)
        key = generate_key()
        return cls(key, _self_signed_root(key, trust_domain, clock()), trust_domain, clock)

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                       clock: Callable[[], datetime] = utcnow) -> CertificateAuthority:
        """The CA persisted in `state_dir` (root-cert.pem, root-key.pem), created if absent."""
        _check_trust_domain(trust_domain)
        loaded = ca_store.load(state_dir)
        if loaded is None:
            key = generate_key()
            cert = _self_signed_root(key, trust_domain, clock())
            ca_store.save(state_dir, cert, key)
            return cls(key, cert, trust_domain, clock)
        cert, key = loaded
        actual = _root_trust_domain(cert)
        if actual != trust_domain:
            raise ca_store.CaStateError(
                f"{state_dir / ca_store.CERT_FILE}: root is for trust domain {actual!r}, "
                f"not {trust_domain!r}")
        return cls(key, cert, trust_domain, clock,
                   roots=(cert, *_extra_roots(state_dir)))

    @classmethod
    def from_plugin(cls, state_dir: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                    clock: Callable[[], datetime] = utcnow) -> CertificateAuthority:
        """A CA signing with the intermediate in ``state_dir`` (``identity.intermediate``:
        ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem). Creates nothing."""
        _check_trust_domain(trust_domain)
        material = intermediate.load_plugin(state_dir, clock())
        return cls(material.key, material.cert, trust_domain, clock,
                   issuer_chain=material.issuer_chain,
                   roots=(*material.roots, *_extra_roots(state_dir)))

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def root_pem(self) -> bytes:
        """The trust bundle: every root peers should accept (PEM, one or more)."""
        return self._root_pem

    @property
    def root_cert(self) -> x509.Certificate:
        """The certificate this CA signs with (the root itself, unless an intermediate)."""
        return self._root_cert

    @property
    def issuer_chain_pem(self) -> bytes:
        """What follows every leaf this CA issues: its intermediates (empty for a root)."""
        return self._issuer_chain_pem

    def sign_workload(self, csr_pem: bytes, *, node: str, registry: WorkloadRegistry,
                      lifetime: timedelta = DEFAULT_WORKLOAD_LIFETIME) -> bytes:
        """Validate a workload CSR for `node` and return the signed leaf as a PEM chain.

        Raises `SigningRefused` with a one-line reason; nothing is signed then.
        """
        identity, public_key = self._validate_csr(csr_pem)
        if not registry.runs_on(node, identity):
            raise SigningRefused(f"node {node!r} runs no workload with identity {identity}",
                                 RefusalKind.FORBIDDEN, identity)
        now = self._clock()
        cert = self._sign_leaf(identity, public_key, now - CLOCK_SKEW, now + lifetime)
        return cert.public_bytes(serialization.Encoding.PEM) + self._issuer_chain_pem

    def issue(self, identity: Identity, lifetime: timedelta = DEFAULT_WORKLOAD_LIFETIME,
              not_before: datetime | None = None) -> CertBundle:
        """Key, CSR and certificate for `identity` with no registry check.

        For tests and local tools only: it skips the node check that is the whole
        point of the CA. With `not_before` the validity is exactly
        [not_before, not_before + lifetime], so a test can ask for an expired
        or not-yet-valid certificate.
        """
        if identity.trust_domain != self._trust_domain:
            raise SigningRefused(
                f"identity {identity} is not in trust domain {self._trust_domain!r}",
                RefusalKind.FORBIDDEN)
        key = generate_key()
        start = not_before if not_before is not None else self._clock() - CLOCK_SKEW
        cert = self._sign_leaf(identity, key.public_key(), start, start + lifetime)
        return CertBundle.from_pem(
            chain_pem=cert.public_bytes(serialization.Encoding.PEM) + self._issuer_chain_pem,
            key_pem=private_key_pem(key), root_pem=self._root_pem, expected=identity)

    def issue_server_credentials(self, hosts: Sequence[str],
                                 lifetime: timedelta = timedelta(days=365)) -> ServerCredentials:
        """A serving certificate for the CA's HTTPS API: IP SANs for addresses, DNS for names.

        Always includes DNS `trellis-ca`, so clients may verify by that name
        whatever address they dial. A wildcard listen address (0.0.0.0, ::) is
        left out: nobody dials it, and it is no name for this server. On
        Kubernetes the names that matter are the Service's (`service_dns_names`).
        """
        key = generate_key()
        names: list[x509.GeneralName] = [x509.DNSName(CA_SERVER_DNS_NAME)]
        for host in dict.fromkeys(hosts):  # in order, once each
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                if host != CA_SERVER_DNS_NAME:
                    names.append(x509.DNSName(host))
                continue
            if not address.is_unspecified:
                names.append(x509.IPAddress(address))
        now = self._clock()
        builder = (
            self._leaf_builder(key.public_key(), now - CLOCK_SKEW, now + lifetime)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_SERVER_DNS_NAME)]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
        )
        cert = builder.sign(self._root_key, hashes.SHA256())
        return ServerCredentials(
            cert.public_bytes(serialization.Encoding.PEM) + self._issuer_chain_pem,
            private_key_pem(key))

    def _validate_csr(self, csr_pem: bytes) -> tuple[Identity, ec.EllipticCurvePublicKey]:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, x509.InvalidVersion) as exc:
            raise SigningRefused(f"CSR is not a PEM certificate request: {exc}") from exc
        # cryptography decodes a CSR lazily: a key of an unknown algorithm, or a
        # point off its curve, raises only here (found by tests/fuzz/fuzz_ca_csr.py).
        try:
            signature_valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SigningRefused(f"CSR key cannot be read: {exc}") from exc
        if not signature_valid:
            raise SigningRefused(
                "CSR signature is invalid: it was altered or not signed by its key")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
                not isinstance(public_key.curve, CURVE):
            raise SigningRefused(
                f"CSR key is {_describe_key(public_key)}; the CA signs only EC P-256 keys")
        uri = _single_uri_san(csr)
        try:
            identity = Identity.parse(uri)
        except InvalidIdentity as exc:
            raise SigningRefused(f"CSR URI SAN is not a SPIFFE workload ID: {exc}") from exc
        if identity.trust_domain != self._trust_domain:
            raise SigningRefused(
                f"CSR asks for {identity}, outside trust domain {self._trust_domain!r}",
                RefusalKind.FORBIDDEN, identity)
        return identity, public_key

    def _sign_leaf(self, identity: Identity, public_key: ec.EllipticCurvePublicKey,
                   not_before: datetime, not_after: datetime) -> x509.Certificate:
        # Empty subject, as Istio does: the identity is the URI SAN, which is
        # therefore critical (RFC 5280 4.2.1.6).
        builder = (
            self._leaf_builder(public_key, not_before, not_after)
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True)
        )
        return builder.sign(self._root_key, hashes.SHA256())

    def _leaf_builder(self, public_key: ec.EllipticCurvePublicKey, not_before: datetime,
                      not_after: datetime) -> x509.CertificateBuilder:
        if not_after <= not_before:
            raise ValueError(f"certificate lifetime must be positive: {not_before} .. {not_after}")
        issuer_ski = self._root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .issuer_name(self._root_cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_encipherment=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski.value),
                critical=False)
        )


_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def service_dns_names(name: str, namespace: str, cluster_domain: str) -> tuple[str, ...]:
    """The names a client in the cluster may dial a Service by: ``NAME``, ``NAME.NS``,
    ``NAME.NS.svc`` and ``NAME.NS.svc.<cluster domain>``. Raises ValueError naming
    the part that is no DNS label (or, for the domain, no DNS name)."""
    for part, value in (("name", name), ("namespace", namespace)):
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"service {part} {value!r} is not a DNS label")
    if not all(_DNS_LABEL.fullmatch(label) for label in cluster_domain.split(".")):
        raise ValueError(f"cluster domain {cluster_domain!r} is not a DNS name")
    qualified = f"{name}.{namespace}.svc"
    return name, f"{name}.{namespace}", qualified, f"{qualified}.{cluster_domain}"


def _single_uri_san(csr: x509.CertificateSigningRequest) -> str:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SigningRefused("CSR has no subjectAltName; it must carry one SPIFFE URI") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise SigningRefused(f"CSR extensions cannot be read: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SigningRefused(f"CSR has {len(uris)} URI SANs {uris}; exactly one is allowed")
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if others:
        # We would drop them silently otherwise, and the caller would get a
        # certificate that does not say what it asked for.
        raise SigningRefused(f"CSR asks for non-URI SANs {others}; only the SPIFFE URI is signed")
    return uris[0]


def _self_signed_root(key: ec.EllipticCurvePrivateKey, trust_domain: str,
                      now: datetime) -> x509.Certificate:
    # The trust domain goes in O, as Istio's self-signed root does, so a
    # persisted root can be checked against the configured trust domain.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, "Trellis root CA"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _extra_roots(state_dir: Path) -> tuple[x509.Certificate, ...]:
    path = state_dir / ca_store.EXTRA_ROOTS_FILE
    return intermediate.load_roots(path) if path.exists() else ()


def _root_trust_domain(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
        key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False, decipher_only=False)


def _serial() -> int:
    # 159 random bits: positive and within RFC 5280's 20-octet limit.
    return secrets.randbits(159) | 1


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _check_trust_domain(trust_domain: str) -> None:
    try:
        Identity.of("default", "default", trust_domain)
    except InvalidIdentity as exc:
        raise ValueError(f"trust_domain {trust_domain!r} is not a valid SPIFFE trust domain") \
            from exc

