"""The node agent's reading of the CA's answer (``read_answer``), byte by byte, with no
server: whatever the CA sends is a bundle or ``CertificateRequestFailed``."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from identity_support import BACKEND, StaticRegistry

from identity.ca import CertificateAuthority
from identity.ca_client import CertificateRequestFailed, read_answer
from identity.certs import build_csr, generate_key

pytestmark = pytest.mark.unit

KEY = generate_key()
CA_URL = "https://trellis-ca:15012"


def _answer(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _signed(ca: CertificateAuthority, chain: list[str] | None = None) -> bytes:
    if chain is None:
        chain = [ca.sign_workload(build_csr(KEY, BACKEND), node="node-1",
                                  registry=StaticRegistry(frozenset({("node-1", BACKEND)})),
                                  lifetime=timedelta(hours=1)).decode()]
    return _answer(json.dumps({"certificate_chain": chain,
                               "root": ca.root_pem.decode()}).encode())


def _leaf_der(ca: CertificateAuthority) -> bytes:
    chain = json.loads(_signed(ca).partition(b"\r\n\r\n")[2])["certificate_chain"]
    return x509.load_pem_x509_certificate(chain[0].encode()).public_bytes(
        serialization.Encoding.DER)


def _pem(der: bytes) -> str:
    return ("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(der).decode()
            + "-----END CERTIFICATE-----\n")


def test_a_signed_answer_is_our_bundle(ca: CertificateAuthority) -> None:
    bundle = read_answer(_signed(ca), key=KEY, identity=BACKEND, ca_url=CA_URL)
    assert bundle.identity == BACKEND


# One field of a CA-signed leaf changed: its version, its key's algorithm OID, its key's
# point, and a second KeyUsage extension (the SubjectKeyIdentifier's OID made KeyUsage's).
@pytest.mark.parametrize(("old", "new", "problem"), [
    (b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x42", "not a PEM certificate chain"),
    (bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209"),
     "unusable key"),
    (b"\x03\x42\x00\x04", b"\x03\x42\x00\x05", "unusable key"),
    (bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d0f"), "extensions cannot be read"),
], ids=["version", "key-algorithm", "key-point", "duplicate-extension"])
def test_a_leaf_cryptography_cannot_read_is_a_failed_request(
        ca: CertificateAuthority, old: bytes, new: bytes, problem: str) -> None:
    # Found by tests/fuzz/fuzz_ca_client.py: InvalidVersion, UnsupportedAlgorithm,
    # ValueError and DuplicateExtension escaped read_answer (and load_pem_chain and
    # identity_of_peer under it), where the agent's certificate fetcher expects
    # CertificateRequestFailed.
    der = _leaf_der(ca)
    assert der.count(old) == 1
    raw = _signed(ca, [_pem(der.replace(old, new))])
    with pytest.raises(CertificateRequestFailed, match=problem) as caught:
        read_answer(raw, key=KEY, identity=BACKEND, ca_url=CA_URL)
    assert caught.value.status == 200


@pytest.mark.parametrize("status", ["200 OK", "403 Forbidden"])
def test_json_nested_past_the_stack_is_a_failed_request(status: str) -> None:
    # Found reviewing tests/fuzz/fuzz_ca_client.py: json.loads raised RecursionError.
    with pytest.raises(CertificateRequestFailed) as caught:
        read_answer(_answer(b"[" * 100_000, status), key=KEY, identity=BACKEND, ca_url=CA_URL)
    assert caught.value.status == int(status[:3])
