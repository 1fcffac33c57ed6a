"""The CA's signing rules: what a signed leaf contains, and every refusal."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from identity_support import BACKEND, FRONTEND, NOW, StaticRegistry

from identity.ca import CLOCK_SKEW, CertificateAuthority, RefusalKind, SigningRefused
from identity.certs import build_csr, generate_key
from identity.spiffe import Identity

pytestmark = pytest.mark.unit

HOUR = timedelta(hours=1)


def _sign(ca: CertificateAuthority, csr: bytes, registry: StaticRegistry,
          node: str = "node-1") -> x509.Certificate:
    chain = x509.load_pem_x509_certificates(
        ca.sign_workload(csr, node=node, registry=registry, lifetime=HOUR))
    assert len(chain) == 1, "the CA has no intermediates: the chain is the leaf alone"
    return chain[0]


def _csr(names: list[x509.GeneralName], key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key or generate_key(), hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def test_root_is_a_pathlen0_ca(ca: CertificateAuthority) -> None:
    root = x509.load_pem_x509_certificate(ca.root_pem)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_signed_leaf_verifies_against_the_root_and_names_only_the_identity(
        fixed_ca: CertificateAuthority, registry: StaticRegistry) -> None:
    key = generate_key()
    leaf = _sign(fixed_ca, build_csr(key, BACKEND), registry)
    verifier = (PolicyBuilder().store(Store([fixed_ca.root_cert])).time(NOW)
                .build_client_verifier())
    verified = verifier.verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(BACKEND.uri)]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(BACKEND.uri)]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()


def test_signed_leaf_extensions_and_lifetime(
        fixed_ca: CertificateAuthority, registry: StaticRegistry) -> None:
    leaf = _sign(fixed_ca, build_csr(generate_key(), BACKEND), registry)
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + HOUR
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    root_ski = fixed_ca.root_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert leaf.issuer == fixed_ca.root_cert.subject


def test_two_signings_get_distinct_serials(ca: CertificateAuthority,
                                           registry: StaticRegistry) -> None:
    csr = build_csr(generate_key(), BACKEND)
    assert _sign(ca, csr, registry).serial_number != _sign(ca, csr, registry).serial_number


def _refusal(ca: CertificateAuthority, csr: bytes, registry: StaticRegistry,
             node: str = "node-1") -> SigningRefused:
    with pytest.raises(SigningRefused) as caught:
        ca.sign_workload(csr, node=node, registry=registry, lifetime=HOUR)
    assert "\n" not in caught.value.reason
    return caught.value


def test_refuses_a_node_that_runs_no_such_workload(ca: CertificateAuthority,
                                                   registry: StaticRegistry) -> None:
    refusal = _refusal(ca, build_csr(generate_key(), BACKEND), registry, node="node-2")
    assert refusal.kind is RefusalKind.FORBIDDEN
    assert refusal.reason == (
        "node 'node-2' runs no workload with identity spiffe://cluster.local/ns/demo/sa/backend")


def test_refuses_another_trust_domain_even_if_scheduled(ca: CertificateAuthority) -> None:
    foreign = Identity.of("demo", "backend", trust_domain="evil.example")
    registry = StaticRegistry(frozenset({("node-1", foreign)}))
    refusal = _refusal(ca, build_csr(generate_key(), foreign), registry)
    assert refusal.kind is RefusalKind.FORBIDDEN
    assert "outside trust domain 'cluster.local'" in refusal.reason


def test_refuses_a_tampered_csr(ca: CertificateAuthority, registry: StaticRegistry) -> None:
    # Sign a request for frontend, then rewrite the SAN to backend (same
    # length) without re-signing: exactly what a man in the middle would do.
    good = x509.load_pem_x509_csr(build_csr(generate_key(), FRONTEND))
    der = good.public_bytes(serialization.Encoding.DER)
    tampered_der = der.replace(b"frontend", b"backend!")
    assert tampered_der != der
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    refusal = _refusal(ca, tampered, StaticRegistry(frozenset()))
    assert refusal.kind is RefusalKind.MALFORMED
    assert "signature is invalid" in refusal.reason


@pytest.mark.parametrize(("names", "message"), [
    ([], "no subjectAltName"),
    ([x509.DNSName("backend.demo")], "has 0 URI SANs"),
    ([x509.UniformResourceIdentifier(BACKEND.uri),
      x509.UniformResourceIdentifier(FRONTEND.uri)], "has 2 URI SANs"),
    ([x509.UniformResourceIdentifier("https://backend.demo/")], "not a SPIFFE workload ID"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local")], "not a SPIFFE workload ID"),
    ([x509.UniformResourceIdentifier(BACKEND.uri), x509.DNSName("backend.demo")],
     "non-URI SANs"),
])
def test_refuses_csrs_without_exactly_one_workload_uri(
        ca: CertificateAuthority, registry: StaticRegistry,
        names: list[x509.GeneralName], message: str) -> None:
    refusal = _refusal(ca, _csr(names), registry)
    assert refusal.kind is RefusalKind.MALFORMED
    assert message in refusal.reason


@pytest.mark.parametrize("blob", [b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                  b"-----END CERTIFICATE REQUEST-----\n"])
def test_refuses_unparseable_csrs(ca: CertificateAuthority, registry: StaticRegistry,
                                  blob: bytes) -> None:
    refusal = _refusal(ca, blob, registry)
    assert refusal.kind is RefusalKind.MALFORMED
    assert refusal.reason.startswith("CSR is not a PEM certificate request")


# A CSR's DER with one field changed: the version, the key's algorithm, its point.
_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1


@pytest.mark.parametrize(("old", "new", "message"), [
    (b"\x02\x01\x00", b"\x02\x01\x08", "not a PEM certificate request: 8 is not a valid"),
    (_EC_PUBLIC_KEY, bytes.fromhex("06072a8648ce3d0209"), "key cannot be read: Unknown key"),
    (b"\x03\x42\x00\x04", b"\x03\x42\x00\x05", "key cannot be read: Invalid key"),
], ids=["version", "key-algorithm", "key-point"])
def test_a_csr_that_fails_only_when_read_is_refused_not_raised(
        ca: CertificateAuthority, registry: StaticRegistry, old: bytes, new: bytes,
        message: str) -> None:
    # Found by tests/fuzz/fuzz_ca_csr.py: cryptography decodes a CSR lazily, so these
    # loaded and then raised InvalidVersion, UnsupportedAlgorithm or ValueError out of
    # sign_workload; the CA server answered nothing and logged a traceback.
    der = x509.load_pem_x509_csr(_csr([x509.UniformResourceIdentifier(BACKEND.uri)])
                                 ).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1
    body = base64.encodebytes(der.replace(old, new))
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"
    refusal = _refusal(ca, pem, registry)
    assert refusal.kind is RefusalKind.MALFORMED
    assert message in refusal.reason


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def test_a_csr_signed_over_a_duplicate_extension_is_refused_not_raised(
        ca: CertificateAuthority, registry: StaticRegistry) -> None:
    # The caller signs its CSR, so a malformed one passes the signature check. This one
    # has two subjectAltNames (its basicConstraints OID made the SAN's); cryptography
    # raised DuplicateExtension out of sign_workload when the SANs were read.
    key = generate_key()
    info = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(BACKEND.uri)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .sign(key, hashes.SHA256()).tbs_certrequest_bytes)
    basic_constraints, san = bytes.fromhex("0603551d13"), bytes.fromhex("0603551d11")
    assert info.count(basic_constraints) == 1
    info = info.replace(basic_constraints, san)
    ecdsa_with_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    der = _der(0x30, info + ecdsa_with_sha256
               + _der(0x03, b"\0" + key.sign(info, ec.ECDSA(hashes.SHA256()))))
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    refusal = _refusal(ca, pem, registry)
    assert refusal.kind is RefusalKind.MALFORMED
    assert refusal.reason.startswith("CSR extensions cannot be read: Duplicate")


def test_refuses_keys_other_than_p256(ca: CertificateAuthority, registry: StaticRegistry) -> None:
    csr = _csr([x509.UniformResourceIdentifier(BACKEND.uri)], key=ec.generate_private_key(
        ec.SECP384R1()))
    refusal = _refusal(ca, csr, registry)
    assert refusal.reason == "CSR key is EC secp384r1; the CA signs only EC P-256 keys"


def test_issue_refuses_foreign_trust_domain(ca: CertificateAuthority) -> None:
    with pytest.raises(SigningRefused, match="not in trust domain"):
        ca.issue(Identity.of("demo", "backend", trust_domain="other.local"))


def test_server_credentials_name_the_ip_and_trellis_ca(ca: CertificateAuthority) -> None:
    creds = ca.issue_server_credentials(["127.0.0.1", "ca.lab"])
    leaf = x509.load_pem_x509_certificate(creds.chain_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["trellis-ca", "ca.lab"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_create_rejects_a_bad_trust_domain() -> None:
    with pytest.raises(ValueError, match="trust_domain 'Not Valid'"):
        CertificateAuthority.create("Not Valid")
