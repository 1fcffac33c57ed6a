"""Workload certificates work as real mTLS credentials, loaded from memory."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from identity_support import BACKEND, FRONTEND

from identity.ca import CertificateAuthority
from identity.certs import CertBundle, identity_of_peer
from identity.tls_pem import load_cert_chain_pem

pytestmark = pytest.mark.inprocess


def _context(purpose: int, bundle: CertBundle) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=bundle.root_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED
    # SVIDs carry no DNS names; callers check the URI SAN themselves.
    context.check_hostname = False
    load_cert_chain_pem(context, bundle.chain_pem, bundle.key_pem)
    return context


def test_mutual_tls_between_two_workloads_sees_each_others_identity(
        ca: CertificateAuthority) -> None:
    server_bundle, client_bundle = ca.issue(BACKEND), ca.issue(FRONTEND)
    seen_by_server: list[bytes] = []

    async def main() -> bytes:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen_by_server.append(writer.get_extra_info("ssl_object").getpeercert(True))
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=_context(ssl.PROTOCOL_TLS_SERVER, server_bundle))
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=_context(ssl.PROTOCOL_TLS_CLIENT, client_bundle))
            peer: bytes = writer.get_extra_info("ssl_object").getpeercert(True)
            await reader.read()
            writer.close()
        return peer

    seen_by_client = asyncio.run(main())
    assert identity_of_peer(seen_by_client) == BACKEND
    assert [identity_of_peer(der) for der in seen_by_server] == [FRONTEND]


def test_a_key_that_does_not_match_the_chain_is_refused(ca: CertificateAuthority) -> None:
    one, other = ca.issue(BACKEND), ca.issue(BACKEND)
    with pytest.raises(ValueError, match="do not load together"):
        load_cert_chain_pem(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), one.chain_pem, other.key_pem)
