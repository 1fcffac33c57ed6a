"""Fuzz the node agent's reading of the CA's answer (identity/ca_client.py, read_answer):
HTTP/1 response, status, error text, JSON, the PEM chain, the leaf's identity and key.

The CA is authenticated by TLS against the mesh root, so this is a peer we trust;
still, nothing it sends may raise anything but ``CertificateRequestFailed``. The
first byte picks what the rest is:

- 0: the CA's whole answer, as read to EOF;
- 1: a DER leaf certificate, sent in a 200 answer as the chain (mutations reach
  the X.509 parser instead of breaking the base64).
"""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric import ec

from identity.ca_client import CertificateRequestFailed, read_answer
from identity.spiffe import Identity

ALLOWED: tuple[type[BaseException], ...] = (CertificateRequestFailed,)
MAX_LEN = 8 * 1024
DICTIONARY = (b"HTTP/1.1 200 OK\r\n", b"Content-Length: ", b"\r\n\r\n", b'"certificate_chain"',
              b'"root"', b'"error"', b"-----BEGIN CERTIFICATE-----\\n",
              b"-----END CERTIFICATE-----\\n", b"[]", b"{}", b"null")

# The key the agent asked with (fixed, so the seed corpus can hold leaves for it).
KEY = ec.derive_private_key(0x7E11_15CA, ec.SECP256R1())
IDENTITY = Identity.of("demo", "backend")


def answer(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _raw(data: bytes) -> bytes:
    if data[:1] != b"\x01":
        return data[1:]
    pem = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data[1:])
           + b"-----END CERTIFICATE-----\n").decode("ascii")
    return answer(json.dumps({"certificate_chain": [pem], "root": pem}).encode())


def one_input(data: bytes) -> None:
    bundle = read_answer(_raw(data), key=KEY, identity=IDENTITY, ca_url="https://trellis-ca")
    assert bundle.identity == IDENTITY
