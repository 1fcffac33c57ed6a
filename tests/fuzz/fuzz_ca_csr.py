"""Fuzz what a ``POST /v1/sign`` body goes through at the CA (identity/ca_api.py,
identity/ca.py): JSON, PEM, the CSR's ASN.1, its key, signature and SANs, and
the signing rules.

The caller is an authenticated node agent (a good bearer token), since anyone
who can reach the CA can be one. The first byte picks what the rest is:

- 0: the request body itself;
- 1: a DER CSR, sent as PEM inside ``{"csr": ...}`` (mutations reach the X.509
  parser instead of breaking the base64);
- 2: the text of the ``csr`` string (read as Latin-1);
- 3: a DER CertificationRequestInfo, which the target signs (with a fixed P-256
  key) into a CSR: a caller can sign whatever it likes, so mutations of the
  extensions and names must get past the signature check to be tried at all.

The API answers every body with a status; nothing may escape ``handle``. When it
signs, the certificate must name exactly the URI the CSR asked for.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca import CertificateAuthority, SigningRefused
from identity.ca_api import SIGN_PATH, CaApi, CaMetrics
from identity.certs import load_pem_chain
from identity.http1 import Request
from identity.node_auth import StaticTokenAuthenticator, token_digest
from identity.spiffe import Identity

ALLOWED: tuple[type[BaseException], ...] = (SigningRefused,)
MAX_LEN = 8 * 1024

TOKEN = "fuzz-node-token-0123456789abcdef"


class _DemoRegistry:
    """Every workload in namespace ``demo`` runs on node-1."""

    def runs_on(self, node: str, identity: Identity) -> bool:
        return node == "node-1" and identity.namespace == "demo"


_API = CaApi(ca=CertificateAuthority.create(), registry=_DemoRegistry(),
             authenticator=StaticTokenAuthenticator({"node-1": token_digest(TOKEN)}),
             lifetime=timedelta(hours=1), metrics=CaMetrics())


_KEY = ec.derive_private_key(0x7E11_15, ec.SECP256R1())
_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")


def _tlv(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def signed_csr(info: bytes) -> bytes:
    """A DER CSR: ``info`` signed by ``_KEY`` (whatever key ``info`` itself names)."""
    signature = _KEY.sign(info, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, info + _ECDSA_WITH_SHA256 + _tlv(0x03, b"\0" + signature))


def _body(data: bytes) -> bytes:
    mode, rest = (data[0] % 4, data[1:]) if data else (0, b"")
    if mode in (1, 3):
        der = signed_csr(rest) if mode == 3 else rest
        pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der)
               + b"-----END CERTIFICATE REQUEST-----\n")
        return json.dumps({"csr": pem.decode("ascii")}).encode()
    if mode == 2:
        return json.dumps({"csr": rest.decode("latin-1")}).encode()
    return rest


def _asked_uris(body: bytes) -> list[str]:
    csr = x509.load_pem_x509_csr(json.loads(body)["csr"].encode())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def one_input(data: bytes) -> None:
    body = _body(data)
    request = Request(headers=(("authorization", f"Bearer {TOKEN}"),), body=body,
                      method="POST", target=SIGN_PATH)
    response = _API.handle(request, peer="198.18.0.1:40000")
    assert response.status in (200, 400, 403), response
    if response.status != 200:
        return
    answer = json.loads(response.body)
    leaf = load_pem_chain("".join(answer["certificate_chain"]).encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    signed = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert signed == _asked_uris(body), f"asked for {_asked_uris(body)}, signed {signed}"
