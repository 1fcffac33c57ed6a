from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from identity_support import BACKEND, NOW

from identity.ca import CertificateAuthority
from identity.certs import (
    CertBundle,
    PeerIdentityError,
    build_csr,
    generate_key,
    identity_of_peer,
    spiffe_ids_of,
)

pytestmark = pytest.mark.unit


def test_generate_key_is_p256() -> None:
    key = generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_csr_has_the_uri_as_its_only_san_and_a_valid_signature() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(build_csr(key, BACKEND))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(BACKEND.uri)]
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


def test_bundle_half_life_and_validity() -> None:
    bundle = CertBundle(BACKEND, b"", b"", b"", NOW, NOW + timedelta(hours=24))
    assert bundle.renew_at == NOW + timedelta(hours=12)
    assert bundle.is_valid(NOW)
    assert bundle.is_valid(NOW + timedelta(hours=23, minutes=59))
    assert not bundle.is_valid(NOW + timedelta(hours=24))
    assert not bundle.is_valid(NOW - timedelta(seconds=1))


def test_bundle_rejects_naive_times_and_empty_lifetime() -> None:
    with pytest.raises(ValueError, match="not_before must be timezone-aware"):
        CertBundle(BACKEND, b"", b"", b"", datetime(2030, 1, 1), NOW)
    with pytest.raises(ValueError, match="is not after not_before"):
        CertBundle(BACKEND, b"", b"", b"", NOW, NOW)


def test_bundle_repr_never_shows_the_key(ca: CertificateAuthority) -> None:
    bundle = ca.issue(BACKEND)
    assert b"PRIVATE KEY" in bundle.key_pem
    assert "PRIVATE" not in repr(bundle) and "BEGIN" not in repr(bundle)


def test_issued_bundle_matches_its_key_and_identity(ca: CertificateAuthority) -> None:
    bundle = ca.issue(BACKEND, lifetime=timedelta(hours=2))
    key = serialization.load_pem_private_key(bundle.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert bundle.leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert bundle.identity == BACKEND
    assert bundle.not_after - bundle.not_before == timedelta(hours=2)
    assert bundle.root_pem == ca.root_pem


def _cert_with_sans(names: list[x509.GeneralName]) -> x509.Certificate:
    key = generate_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_identity_of_peer_reads_the_one_uri_san(ca: CertificateAuthority) -> None:
    bundle = ca.issue(BACKEND)
    assert identity_of_peer(_der(bundle.leaf)) == BACKEND
    assert spiffe_ids_of(bundle.leaf) == [BACKEND.uri]


@pytest.mark.parametrize(("names", "message"), [
    ([], "has 0 URI SANs"),
    ([x509.DNSName("backend.demo")], "has 0 URI SANs"),
    ([x509.UniformResourceIdentifier(BACKEND.uri),
      x509.UniformResourceIdentifier("spiffe://cluster.local/ns/demo/sa/other")], "has 2 URI SANs"),
    ([x509.UniformResourceIdentifier("https://backend.demo")], "not a workload ID"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local/backend")], "not a workload ID"),
])
def test_identity_of_peer_refuses_certificates_without_exactly_one_svid(
        names: list[x509.GeneralName], message: str) -> None:
    with pytest.raises(PeerIdentityError, match=message):
        identity_of_peer(_der(_cert_with_sans(names)))


def test_identity_of_peer_refuses_garbage() -> None:
    with pytest.raises(PeerIdentityError, match="not valid DER"):
        identity_of_peer(b"\x30\x03garbage")


def test_spiffe_ids_of_ignores_other_uris() -> None:
    cert = _cert_with_sans([x509.UniformResourceIdentifier("https://x.example"),
                            x509.UniformResourceIdentifier(BACKEND.uri)])
    assert spiffe_ids_of(cert) == [BACKEND.uri]
    assert spiffe_ids_of(_cert_with_sans([])) == []


def test_from_pem_refuses_a_certificate_for_another_identity(ca: CertificateAuthority) -> None:
    bundle = ca.issue(BACKEND)
    other = BACKEND.of("demo", "frontend")
    with pytest.raises(PeerIdentityError, match=r"expected spiffe://cluster\.local/ns/demo/sa/frontend"):
        CertBundle.from_pem(chain_pem=bundle.chain_pem, key_pem=bundle.key_pem,
                            root_pem=bundle.root_pem, expected=other)


def test_expired_certificates_can_be_issued_for_tests(ca: CertificateAuthority) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    bundle = ca.issue(BACKEND, lifetime=timedelta(hours=1), not_before=start)
    assert (bundle.not_before, bundle.not_after) == (start, start + timedelta(hours=1))
    assert not bundle.is_valid(datetime.now(UTC))
