"""A CA running from an intermediate (identity/intermediate.py, Istio's ``cacerts``
layout): leaves carry the chain and verify against the root alone; material that
does not fit together is refused with an error naming the file."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from identity_support import BACKEND, FRONTEND, StaticRegistry

from identity.ca import CertificateAuthority
from identity.ca_client import request_certificate
from identity.ca_server import CaServerConfig, serve_ca
from identity.ca_store import CaStateError
from identity.certs import CertBundle, generate_key, load_pem_chain, private_key_pem
from identity.node_auth import StaticTokenAuthenticator, token_digest
from tunnel import tls

pytestmark = pytest.mark.inprocess  # real TLS on socket pairs and loopback

NOW = datetime.now(UTC)


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
             issuer_key: ec.EllipticCurvePrivateKey, path_length: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder().subject_name(name)
        .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .add_extension(ski, critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def make_plugin(where: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """An offline root and an intermediate it signed, written as a cacerts Secret."""
    root_key, ca_key = generate_key(), generate_key()
    root = _ca_cert("offline root", root_key, None, root_key, 1)
    inter = _ca_cert("cluster intermediate", ca_key, root, root_key, 0)
    where.mkdir()
    (where / "ca-cert.pem").write_bytes(_pem(inter))
    (where / "ca-key.pem").write_bytes(private_key_pem(ca_key))
    (where / "ca-key.pem").chmod(0o600)
    (where / "cert-chain.pem").write_bytes(_pem(inter, root))
    (where / "root-cert.pem").write_bytes(_pem(root))
    return root, inter


def _handshake(server: CertBundle, client: CertBundle) -> str:
    """mTLS between two proxies' contexts; the server's view of the client's SAN."""
    a, b = socket.socketpair()
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with tls.server_context(server).wrap_socket(a, server_side=True) as conn:
                result["peer"] = str(tls.peer_identity(conn, "cluster.local"))
        except (ssl.SSLError, OSError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with tls.client_context(client).wrap_socket(b) as conn:
            tls.peer_identity(conn, "cluster.local")
    finally:
        b.close()
        thread.join(10)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return str(result["peer"])


def test_leaves_carry_the_chain_and_verify_against_the_root_alone(tmp_path: Path) -> None:
    root, inter = make_plugin(tmp_path / "cacerts")
    ca = CertificateAuthority.from_plugin(tmp_path / "cacerts")
    assert load_pem_chain(ca.root_pem) == [root]  # the trust bundle: the root only
    backend, frontend = ca.issue(BACKEND), ca.issue(FRONTEND)
    chain = load_pem_chain(backend.chain_pem)
    assert chain[1:] == [inter] and chain[0].issuer == inter.subject
    assert _handshake(backend, frontend) == str(FRONTEND)
    # Control: the same leaf without its intermediate does not verify to the root,
    # so the chain the CA attaches is what makes it work.
    bare = CertBundle.from_pem(chain_pem=_pem(load_pem_chain(frontend.chain_pem)[0]),
                               key_pem=frontend.key_pem, root_pem=frontend.root_pem)
    with pytest.raises(ssl.SSLError):
        _handshake(backend, bare)


def test_the_ca_api_serves_and_signs_with_the_intermediate(tmp_path: Path) -> None:
    root, inter = make_plugin(tmp_path / "cacerts")
    ca = CertificateAuthority.from_plugin(tmp_path / "cacerts")
    registry = StaticRegistry(frozenset({("node-1", BACKEND)}))

    async def main() -> CertBundle:
        config = CaServerConfig(host="127.0.0.1", port=0)
        auth = StaticTokenAuthenticator({"node-1": token_digest("t")})
        async with await serve_ca(config, ca, registry, auth) as server:
            # The client trusts the root alone: the CA's serving chain has to verify too.
            return await request_certificate(ca_url=server.url, ca_root_pem=_pem(root),
                                             token="t", identity=BACKEND)

    bundle = asyncio.run(main())
    assert load_pem_chain(bundle.chain_pem)[1:] == [inter]
    assert load_pem_chain(bundle.root_pem) == [root]


def test_a_key_that_is_not_the_certificates_is_refused_naming_the_file(
        tmp_path: Path) -> None:
    make_plugin(tmp_path / "cacerts")
    (tmp_path / "cacerts" / "ca-key.pem").write_bytes(private_key_pem(generate_key()))
    with pytest.raises(CaStateError, match=r"ca-key\.pem is not the private key of .*ca-cert"):
        CertificateAuthority.from_plugin(tmp_path / "cacerts")


@pytest.mark.parametrize(("breakage", "named"), [
    ("other_root", r"cert-chain\.pem does not lead to a root in .*root-cert\.pem"),
    ("chain_not_from_ca_cert", r"cert-chain\.pem does not start with .*ca-cert\.pem"),
    ("missing_chain", r"cert-chain\.pem: missing"),
    ("leaf_as_ca_cert", r"ca-cert\.pem is not a CA certificate"),
    ("loose_key", r"ca-key\.pem has mode 0644"),
])
def test_material_that_does_not_fit_is_refused_naming_the_file(
        tmp_path: Path, breakage: str, named: str) -> None:
    where = tmp_path / "cacerts"
    root, _inter = make_plugin(where)
    other_root, _ = make_plugin(tmp_path / "other")
    if breakage == "other_root":
        (where / "root-cert.pem").write_bytes(_pem(other_root))
    elif breakage == "chain_not_from_ca_cert":
        (where / "cert-chain.pem").write_bytes(_pem(root))
    elif breakage == "missing_chain":
        (where / "cert-chain.pem").unlink()
    elif breakage == "leaf_as_ca_cert":
        leaf_ca = CertificateAuthority.create()
        bundle = leaf_ca.issue(BACKEND)
        (where / "ca-cert.pem").write_bytes(bundle.chain_pem)
        (where / "ca-key.pem").write_bytes(bundle.key_pem)
        (where / "cert-chain.pem").write_bytes(bundle.chain_pem)
    elif breakage == "loose_key":
        (where / "ca-key.pem").chmod(0o644)
    with pytest.raises(CaStateError, match=named):
        CertificateAuthority.from_plugin(where)


def test_extra_roots_join_the_trust_bundle(tmp_path: Path) -> None:
    state = tmp_path / "root"
    first = CertificateAuthority.load_or_create(state)
    assert len(load_pem_chain(first.root_pem)) == 1
    nxt = CertificateAuthority.create()
    (state / "extra-roots.pem").write_bytes(nxt.root_pem)
    both = CertificateAuthority.load_or_create(state)
    assert load_pem_chain(both.root_pem) == [first.root_cert, nxt.root_cert]
    # A peer whose leaf comes from the next root is accepted by the bundle of both,
    # and (control) refused by the first root alone.
    newer = nxt.issue(FRONTEND)
    client = CertBundle.from_pem(chain_pem=newer.chain_pem, key_pem=newer.key_pem,
                                 root_pem=both.root_pem)
    assert _handshake(both.issue(BACKEND), client) == str(FRONTEND)
    with pytest.raises(ssl.SSLError):
        _handshake(first.issue(BACKEND), client)
    (state / "extra-roots.pem").write_bytes(both.issue(BACKEND).chain_pem)  # not a root
    with pytest.raises(CaStateError, match=r"extra-roots\.pem: .* is not a self-signed CA"):
        CertificateAuthority.load_or_create(state)
