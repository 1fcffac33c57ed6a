"""Fuzz the proxy's reading of its trust bundle file (identity/trust_bundle.py,
``TrustBundle.parse``): the mounted ConfigMap the CA writes, which anyone allowed to
edit ConfigMaps in the proxies' namespace can change too. Nothing may raise but
``TrustBundleError``; a bundle that parses holds only CA certificates, one
fingerprint each. The first byte picks what the rest is:

- 0: the file's bytes as they are (PEM text, several blocks, garbage around them);
- 1: one DER certificate wrapped in PEM (mutations reach the X.509 parser instead
  of breaking the base64).
"""

from __future__ import annotations

import base64

from identity.trust_bundle import TrustBundle, TrustBundleError

ALLOWED: tuple[type[BaseException], ...] = (TrustBundleError,)
MAX_LEN = 16 * 1024
DICTIONARY = (b"-----BEGIN CERTIFICATE-----\n", b"-----END CERTIFICATE-----\n", b"\n")


def _raw(data: bytes) -> bytes:
    if data[:1] != b"\x01":
        return data[1:]
    return (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data[1:])
            + b"-----END CERTIFICATE-----\n")


def one_input(data: bytes) -> None:
    bundle = TrustBundle.parse(_raw(data), "root-cert.pem")
    assert 0 < len(bundle) and bundle.pem.count(b"-----BEGIN CERTIFICATE-----") >= len(bundle)
