"""The trust bundle file's parser refuses, with TrustBundleError naming the file,
certificates whose subject does not decode (found by tests/fuzz/fuzz_trust_bundle.py:
a ValueError and a TypeError out of cryptography's lazy name decoding, which would
have ended the proxy's bundle follower)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from identity.ca import CertificateAuthority
from identity.trust_bundle import BundleFile, TrustBundle, TrustBundleError

pytestmark = pytest.mark.unit

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "trust_bundle"


def _as_file(name: str) -> bytes:
    data = (CORPUS / name).read_bytes()
    assert data[:1] == b"\x01"  # a DER certificate, as the target wraps it
    return (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data[1:])
            + b"-----END CERTIFICATE-----\n")


@pytest.mark.parametrize("name", ["crash-subject-valueerror", "crash-subject-typeerror"])
def test_an_undecodable_subject_is_a_refused_bundle(tmp_path: Path, name: str) -> None:
    with pytest.raises(TrustBundleError, match=r"root-cert\.pem: certificate 1 of 1 is not"):
        TrustBundle.parse(_as_file(name), "root-cert.pem")
    path = tmp_path / "root-cert.pem"
    path.write_bytes(CertificateAuthority.create().root_pem)
    bundle_file = BundleFile(path, registry=CollectorRegistry())
    path.write_bytes(_as_file(name))
    assert bundle_file.check() is None  # refused, the bundle in force stays
    assert bundle_file.reloads.labels(result="invalid")._value.get() == 1
