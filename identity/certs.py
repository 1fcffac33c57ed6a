"""Keys, CSRs and certificate bundles for workload identities.

A workload certificate is an X.509-SVID: an ECDSA P-256 leaf whose only URI SAN
is the workload's SPIFFE ID. Everything that turns bytes into an `Identity`
goes through `identity_of_peer`, so the "exactly one SPIFFE URI SAN" rule lives
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.spiffe import Identity, InvalidIdentity

# The one key type Trellis issues and accepts: P-256 is what ztunnel and Istio
# use, and every TLS stack we talk to supports it.
CURVE = ec.SECP256R1


class PeerIdentityError(ValueError):
    """A peer certificate that does not name exactly one workload SPIFFE ID."""


def utcnow() -> datetime:
    """The real clock, timezone-aware; the default wherever a clock is injected."""
    return datetime.now(UTC)


def spki(key: object) -> bytes:
    """A public key's DER SubjectPublicKeyInfo, for "is this the same key"; empty
    for a key type Trellis does not use, which then matches no P-256 key."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: it only ever lives in memory or in a 0600 file."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """A PEM CSR asking for `identity`; its only SAN is the SPIFFE URI.

    The subject stays empty: an SVID's identity is its URI SAN, and the CA
    ignores subjects anyway.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_pem_chain(chain_pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM blob, in order; a clear error if there is none."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise ValueError(f"not a PEM certificate chain: {exc}") from exc
    return certs


def split_pem_chain(chain_pem: bytes) -> list[str]:
    """Each certificate of a PEM chain as its own PEM string, in order (the API's JSON form)."""
    return [cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
            for cert in load_pem_chain(chain_pem)]


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """The URI SANs of `cert` that use the spiffe scheme (possibly none)."""
    return [uri for uri in _uri_sans(cert) if uri.startswith("spiffe://")]


def identity_of_peer(peercert_der: bytes) -> Identity:
    """The workload identity a DER peer certificate proves (e.g. from `getpeercert(True)`).

    The X.509-SVID rule is *exactly one* URI SAN; a certificate with two could
    be read as either identity by different checks, so we refuse it.
    """
    try:
        cert = x509.load_der_x509_certificate(peercert_der)
    except ValueError as exc:
        raise PeerIdentityError(f"peer certificate is not valid DER: {exc}") from exc
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise PeerIdentityError(
            f"peer certificate has {len(uris)} URI SANs {uris}; an SVID has exactly one")
    try:
        return Identity.parse(uris[0])
    except InvalidIdentity as exc:
        raise PeerIdentityError(f"peer certificate URI SAN is not a workload ID: {exc}") from exc


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    # Extensions are decoded only here. A TLS peer's certificate gets here after OpenSSL
    # verified it against our root; the CA client reads the CA's answer unverified.
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise PeerIdentityError(f"certificate extensions cannot be read: {exc}") from None
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class CertBundle:
    """One identity's credentials: what a TLS context needs, plus the schedule.

    `chain_pem` is the leaf first, then intermediates (never the root);
    `root_pem` holds the trust anchors peers are verified against.
    """

    identity: Identity
    # PEM stays out of repr: a logged bundle shows identity and validity, and
    # never the private key.
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    root_pem: bytes = field(repr=False)
    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        for name in ("not_before", "not_after"):
            value: datetime = getattr(self, name)
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"CertBundle.{name} must be timezone-aware (UTC), got {value!r}")
        if self.not_after <= self.not_before:
            raise ValueError(
                f"CertBundle for {self.identity}: not_after {self.not_after.isoformat()} "
                f"is not after not_before {self.not_before.isoformat()}")

    @classmethod
    def from_pem(cls, *, chain_pem: bytes, key_pem: bytes, root_pem: bytes,
                 expected: Identity | None = None) -> CertBundle:
        """Build a bundle from PEM, reading identity and validity from the leaf.

        With `expected`, a leaf naming any other identity is an error: the
        caller asked for one identity and must not silently hold another.
        """
        leaf = load_pem_chain(chain_pem)[0]
        identity = identity_of_peer(leaf.public_bytes(serialization.Encoding.DER))
        if expected is not None and identity != expected:
            raise PeerIdentityError(f"certificate is for {identity}, expected {expected}")
        return cls(
            identity=identity,
            chain_pem=chain_pem,
            key_pem=key_pem,
            root_pem=root_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    @property
    def leaf(self) -> x509.Certificate:
        return load_pem_chain(self.chain_pem)[0]

    @property
    def renew_at(self) -> datetime:
        """The half-life point, when Istio-style rotation asks for a new certificate."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after
