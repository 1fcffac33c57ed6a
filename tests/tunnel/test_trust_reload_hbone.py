"""Root rotation on a live HBONE listener (tests/tunnel/hbone_env.py): the 15008
listener keeps the context it was started with, and follows the trust bundle file
as the kubelet swaps it: a client from the new root is refused, then accepted once
the bundle has both roots; a client from the old root is refused once the old root
leaves, while the pooled connection it opened before carries new streams."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from hbone_env import HboneEnv, client_socket, run
from prometheus_client import CollectorRegistry
from test_trust_reload import BACKEND, FRONTEND, Issued, kubelet_volume

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.trust_bundle import BundleFile
from tunnel import tls
from tunnel.hbone_io import HboneConnection, TunnelClosed
from tunnel.identities import TlsIdentities

pytestmark = pytest.mark.inprocess


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_a_live_hbone_listener_follows_the_bundle(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    old, new = CertificateAuthority.create(), CertificateAuthority.create()
    volume = tmp_path / "ca-root"
    bundle_file = BundleFile(kubelet_volume(volume, old.root_pem),
                             registry=CollectorRegistry())
    identities = TlsIdentities(Issued(old.issue(BACKEND)), trust=bundle_file.current)

    def client_of(ca: CertificateAuthority) -> CertBundle:
        # Another node's proxy, already trusting both roots.
        issued = ca.issue(FRONTEND)
        return CertBundle.from_pem(chain_pem=issued.chain_pem, key_pem=issued.key_pem,
                                   root_pem=old.root_pem + new.root_pem)

    def reload(content: bytes) -> None:
        kubelet_volume(volume, content)
        changed = bundle_file.check()
        assert changed is not None
        identities.on_trust_changed(changed)

    async def main() -> None:
        app = await asyncio.start_server(_echo, "127.0.0.1", 0)
        env = HboneEnv(client_of(old), old.issue(BACKEND))
        env.server_ctx = await identities.server_context(BACKEND)  # the listener's, for good
        await env.start()
        env.app_address = app.sockets[0].getsockname()

        async def through_pool(message: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(message)
            got = await reader.readexactly(len(message))
            writer.close()
            return got

        async def fresh(ca: CertificateAuthority) -> bool:
            """A new connection from a client of ``ca``'s root: accepted?"""
            before = len(env.inbound.requests)
            try:
                conn = await HboneConnection.connect(
                    client_socket(), env.hbone_address, tls.client_context(client_of(ca)),
                    BACKEND, trust_domain="cluster.local", connect_timeout=5)
                try:
                    stream = await conn.open_stream(f"127.0.0.1:{env.app_address[1]}", [])
                    stream.close()
                finally:
                    conn.close()
                    await conn.wait_closed()
            except (TunnelClosed, OSError):
                return False
            return len(env.inbound.requests) > before

        try:
            assert await through_pool(b"before") == b"before"  # pooled, from the old root
            assert env.tls_connections == 1
            assert not await fresh(new)  # control: the new root is not trusted yet
            reload(old.root_pem + new.root_pem)
            assert await fresh(new)
            reload(new.root_pem)
            with caplog.at_level(logging.WARNING):
                assert not await fresh(old)
            assert "no longer in the trust bundle" in caplog.text
            assert await fresh(new)
            # The connection made before both changes was never dropped: the pool
            # carries a new stream on it, without a new TLS connection.
            assert await through_pool(b"after") == b"after"
            assert env.tls_connections == 1
        finally:
            await env.close()
            app.close()
            await app.wait_closed()

    run(main)
