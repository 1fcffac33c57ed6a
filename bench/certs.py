"""Certificates for the peer proxies (Envoy, stunnel): a throw-away CA and one leaf
per side, the same kind Trellis's CA issues (ECDSA P-256, the SPIFFE ID as URI
SAN, 24 h), so every scenario pays for the same handshake.

The Trellis CA signs only for node agents, for workloads on their node; the
peers are not node agents, so the bench makes its own CA in a temporary
directory that ``PeerCerts.remove`` deletes.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.certs import generate_key, private_key_pem

LIFETIME = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Leaf:
    cert: Path  # PEM, leaf only
    key: Path  # PEM, PKCS#8
    spiffe_id: str


@dataclass(frozen=True)
class PeerCerts:
    directory: Path
    ca: Path
    client: Leaf
    server: Leaf

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _root(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(_name("trellis bench CA"))
            .issuer_name(_name("trellis bench CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))


def _leaf(ca_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
          spiffe_id: str, now: datetime.datetime) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(_name("trellis bench CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))


def make_peer_certs(client_id: str, server_id: str) -> PeerCerts:
    directory = Path(tempfile.mkdtemp(prefix="trellis-bench-certs-"))
    now = datetime.datetime.now(datetime.UTC)
    ca_key = generate_key()
    (directory / "ca.pem").write_bytes(_pem(_root(ca_key, now)))
    leaves = []
    for name, spiffe_id in (("client", client_id), ("server", server_id)):
        key = generate_key()
        cert, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        cert.write_bytes(_pem(_leaf(ca_key, key, spiffe_id, now)))
        key_path.write_bytes(private_key_pem(key))
        key_path.chmod(0o600)
        leaves.append(Leaf(cert, key_path, spiffe_id))
    return PeerCerts(directory, directory / "ca.pem", leaves[0], leaves[1])
