"""HBONE end to end on loopback: real TLS, certificates from the real CA, uvloop."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime, timedelta

import pytest
from conftest import BACKEND, FRONTEND
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from hbone_env import HboneEnv, client_socket, run

from identity.ca import CertificateAuthority
from identity.certs import CertBundle, generate_key, private_key_pem
from identity.spiffe import Identity
from tunnel import hbone, tls
from tunnel.hbone_io import (
    STREAM_SEND_HIGH_WATER,
    HboneConnection,
    HboneListener,
    PeerIdentityMismatch,
    StreamRejected,
    TunnelClosed,
)

pytestmark = pytest.mark.inprocess

MiB = 1024 * 1024


async def start_app(handle_client) -> tuple[asyncio.Server, tuple[str, int]]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handle_client, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_bytes_flow_both_ways_through_the_tunnel(frontend_bundle: CertBundle,
                                                 backend_bundle: CertBundle) -> None:
    async def main() -> None:
        app, app_address = await start_app(echo)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app_address
        try:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            for message in (b"ping", b"x" * 300_000, b"pong"):
                writer.write(message)
                assert await reader.readexactly(len(message)) == message
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            request = env.inbound.requests[0]
            assert request.peer_identity == FRONTEND
            assert request.address == app_address
            assert request.peer_address[0] == "127.0.0.1"
            assert request.local_address == env.hbone_address
            result = await env.inbound.handles[0].wait()
            assert (result.a_to_b, result.b_to_a, result.error) == (300_008, 300_008, None)
        finally:
            await env.close()
            app.close()

    run(main)


def test_large_upload_then_half_close_keeps_the_tail_and_gets_the_reply(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    """others.md: with per-connection TLS the tail after a half-close was lost."""
    size = 64 * MiB
    block = bytes(range(256)) * 4096  # 1 MiB
    reply_tail = b"T" * (2 * MiB + 17)

    async def digest_then_reply(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        h, n = hashlib.sha256(), 0
        while data := await reader.read(1 << 20):
            h.update(data)
            n += len(data)
        writer.write(f"{n} {h.hexdigest()}\n".encode() + reply_tail)
        await writer.drain()
        writer.close()

    async def main() -> None:
        app, app_address = await start_app(digest_then_reply)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app_address
        try:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            expected = hashlib.sha256()
            for _ in range(size // len(block)):
                writer.write(block)
                expected.update(block)
                await writer.drain()
            writer.write_eof()
            reply = await reader.read(-1)
            writer.close()
            line, _, tail = reply.partition(b"\n")
            assert line.decode() == f"{size} {expected.hexdigest()}"
            assert tail == reply_tail
        finally:
            await env.close()
            app.close()

    run(main, timeout=25)


def test_200_concurrent_connections_share_two_tls_connections(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    async def main() -> None:
        app, app_address = await start_app(echo)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app_address
        gate = asyncio.Event()

        async def one(i: int) -> None:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            message = f"hello {i}".encode()
            writer.write(message)
            assert await reader.readexactly(len(message)) == message
            await gate.wait()  # hold every stream open until all 200 exist
            writer.close()

        try:
            clients = [asyncio.ensure_future(one(i)) for i in range(200)]
            while len(env.inbound.handles) < 200:
                await asyncio.sleep(0.01)
            assert env.tls_connections == env.pool.connects_started == 2
            assert env.pool.connection_count(env.key()) == 2
            gate.set()
            await asyncio.gather(*clients)
        finally:
            await env.close()
            app.close()

    run(main)


def test_wrong_server_identity_is_refused(frontend_bundle: CertBundle,
                                          backend_bundle: CertBundle) -> None:
    async def main() -> None:
        env = await HboneEnv(frontend_bundle, backend_bundle,
                             expected_peer=Identity.of("default", "someone-else")).start()
        try:
            with pytest.raises(PeerIdentityMismatch) as caught:
                await env.connect()
            assert caught.value.actual == BACKEND
            assert env.inbound.requests == []
        finally:
            await env.close()

    run(main)


def _self_signed(identity: Identity, root_pem: bytes) -> CertBundle:
    key = generate_key()
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "impostor")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri)]), critical=True)
            .sign(key, hashes.SHA256()))
    return CertBundle.from_pem(chain_pem=cert.public_bytes(serialization.Encoding.PEM),
                               key_pem=private_key_pem(key), root_pem=root_pem)


@pytest.mark.parametrize("impostor", ["self-signed", "other-mesh-ca", "other-trust-domain"])
def test_client_without_a_trusted_certificate_never_reaches_the_handler(
        impostor: str, ca: CertificateAuthority, other_ca: CertificateAuthority,
        backend_bundle: CertBundle, caplog: pytest.LogCaptureFixture) -> None:
    server_bundle = backend_bundle
    if impostor == "self-signed":
        client_bundle = _self_signed(FRONTEND, ca.root_pem)
    else:
        foreign = other_ca.issue(Identity.of("default", "frontend", "other.example"))
        # The client trusts our root, so it can verify the server and get that far.
        client_bundle = CertBundle.from_pem(chain_pem=foreign.chain_pem,
                                            key_pem=foreign.key_pem, root_pem=ca.root_pem)
        if impostor == "other-trust-domain":
            # The server trusts the other root too: TLS succeeds, the trust domain check
            # is what must stop it.
            server_bundle = CertBundle.from_pem(
                chain_pem=backend_bundle.chain_pem, key_pem=backend_bundle.key_pem,
                root_pem=ca.root_pem + other_ca.root_pem)

    async def main() -> None:
        env = await HboneEnv(client_bundle, server_bundle).start()
        try:
            with caplog.at_level(logging.WARNING, logger="trellis.tunnel.hbone"), \
                    pytest.raises((TunnelClosed, OSError)):
                conn = await env.connect()
                await conn.open_stream("127.0.0.1:1", [])
            assert env.inbound.requests == []
            if impostor == "other-trust-domain":
                assert "outside trust domain 'cluster.local'" in caplog.text
        finally:
            await env.close()

    run(main)


def test_client_without_any_certificate_is_refused(ca: CertificateAuthority,
                                                   backend_bundle: CertBundle) -> None:
    import ssl

    async def main() -> None:
        env = await HboneEnv(backend_bundle, backend_bundle).start()
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.minimum_version = ssl.TLSVersion.TLSv1_3
        bare.set_alpn_protocols(["h2"])
        bare.load_verify_locations(cadata=ca.root_pem.decode())
        try:
            with pytest.raises((TunnelClosed, OSError)):
                await HboneConnection.connect(client_socket(), env.hbone_address, bare, BACKEND,
                                              trust_domain="cluster.local", connect_timeout=5)
            assert env.inbound.requests == []
        finally:
            await env.close()

    run(main)


@pytest.mark.parametrize("status", [401, 503])
def test_handler_rejection_reaches_the_client(status: int, frontend_bundle: CertBundle,
                                              backend_bundle: CertBundle) -> None:
    async def main() -> None:
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.inbound.reject_with = status
        try:
            conn = await env.connect()
            with pytest.raises(StreamRejected) as caught:
                await conn.open_stream("127.0.0.1:9", [("forwarded", 'for="10.0.0.1"')])
            assert caught.value.status == status
            assert env.inbound.requests[0].headers == (("forwarded", 'for="10.0.0.1"'),)
            assert conn.available_streams == hbone.MAX_CONCURRENT_STREAMS
            conn.close()
            await conn.wait_closed()
        finally:
            await env.close()

    run(main)


def test_unreachable_upstream_is_503(frontend_bundle: CertBundle,
                                     backend_bundle: CertBundle) -> None:
    async def main() -> None:
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        probe = client_socket()
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        try:
            conn = await env.connect()
            with pytest.raises(StreamRejected) as caught:
                await conn.open_stream(f"127.0.0.1:{closed_port}", [])
            assert caught.value.status == 503
            conn.close()
        finally:
            await env.close()

    run(main)


def test_a_sink_that_stops_reading_bounds_what_the_sender_buffers(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    async def main() -> None:
        resume_app = asyncio.Event()
        app_received = 0

        async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal app_received
            await resume_app.wait()
            while data := await reader.read(1 << 20):
                app_received += len(data)
            writer.close()

        app, app_address = await start_app(stalled)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        try:
            conn = await env.connect()
            stream = await conn.open_stream(f"{app_address[0]}:{app_address[1]}", [])
            writable = asyncio.Event()
            writable.set()
            stream.on_write_paused = writable.clear
            stream.on_write_resumed = writable.set
            chunk = b"b" * (256 * 1024)
            sent = 0
            peak_buffered = 0
            while True:  # a well-behaved source: write while not paused
                try:
                    await asyncio.wait_for(writable.wait(), 0.5)
                except TimeoutError:
                    break  # paused for half a second: the whole path is full
                stream.write(chunk)
                sent += len(chunk)
                peak_buffered = max(peak_buffered, conn._proto.buffered(stream.stream_id))
                assert sent < 200 * MiB, "the sender was never paused"
            # Everything in flight: kernel socket buffers, the upstream TCP buffer (1 MiB),
            # the stream window (4 MiB), the TLS buffers; well under this bound.
            assert sent < 48 * MiB
            assert peak_buffered < STREAM_SEND_HIGH_WATER + len(chunk)
            server_stream = env.inbound.handles[0].a
            assert len(b"".join(server_stream._pending)) <= hbone.STREAM_WINDOW
            # The sink reads again: everything arrives, and the sender may go on.
            resume_app.set()
            stream.write_eof()
            await env.inbound.handles[0].wait()
            await asyncio.sleep(0.05)
            assert app_received == sent
            conn.close()
        finally:
            await env.close()
            app.close()

    run(main)


def test_splice_handle_close_ends_both_sides(frontend_bundle: CertBundle,
                                             backend_bundle: CertBundle) -> None:
    async def main() -> None:
        app_saw: list[BaseException | bytes] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                app_saw.append(await reader.read())  # until EOF or reset
            except ConnectionError as exc:
                app_saw.append(exc)
            writer.close()

        app, app_address = await start_app(hold)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app_address
        try:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"before the policy change")
            await env.inbound.handle_ready.wait()
            await asyncio.sleep(0.05)
            handle = env.inbound.handles[0]
            handle.close("denied by policy default/deny-all")
            result = await handle.wait()
            assert result.error == "denied by policy default/deny-all"
            assert result.a_to_b == len(b"before the policy change")
            with pytest.raises(ConnectionResetError):  # the client side: reset, not EOF
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            for _ in range(100):
                if app_saw:
                    break
                await asyncio.sleep(0.02)
            assert isinstance(app_saw[0], ConnectionResetError)  # and the app side too
        finally:
            await env.close()
            app.close()

    run(main)


def test_idle_pooled_connection_is_closed(frontend_bundle: CertBundle,
                                          backend_bundle: CertBundle) -> None:
    async def main() -> None:
        app, app_address = await start_app(echo)
        env = await HboneEnv(frontend_bundle, backend_bundle, idle_timeout=0.3).start()
        env.app_address = app_address
        try:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await asyncio.sleep(0.5)
            assert env.pool.connection_count() == 1  # busy: not idle, not closed
            writer.close()
            await asyncio.sleep(0.6)
            assert env.pool.connection_count() == 0
            # The next connection opens a fresh tunnel connection.
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
            writer.close()
            assert env.pool.connects_started == 2
        finally:
            await env.close()
            app.close()

    run(main)


def test_concurrent_acquirers_share_one_failed_connect(frontend_bundle: CertBundle,
                                                       backend_bundle: CertBundle) -> None:
    from tunnel.pool import HboneConnectionPool, PoolKey

    async def main() -> None:
        pool = HboneConnectionPool()
        attempts = 0

        async def refused() -> HboneConnection:
            nonlocal attempts
            attempts += 1
            await asyncio.sleep(0.05)
            raise ConnectionRefusedError("nobody home")

        key = PoolKey(FRONTEND, "127.0.0.1", BACKEND, ("127.0.0.1", 15008))
        outcomes = await asyncio.gather(*(pool.acquire(key, refused) for _ in range(20)),
                                        return_exceptions=True)
        assert attempts == 1
        assert all(isinstance(o, ConnectionRefusedError) for o in outcomes)
        await pool.close_all()

    run(main)


def test_tls_is_1_3_with_h2_and_aes_gcm(frontend_bundle: CertBundle,
                                        backend_bundle: CertBundle) -> None:
    async def main() -> None:
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        try:
            conn = await env.connect()
            ssl_object = conn._transport.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.3"
            assert ssl_object.selected_alpn_protocol() == "h2"
            assert "GCM" in ssl_object.cipher()[0]
            assert tls.peer_identity(ssl_object, "cluster.local") == BACKEND
            with pytest.raises(tls.WrongTrustDomain):
                tls.peer_identity(ssl_object, "other.example")
            conn.close()
            await conn.wait_closed()
        finally:
            await env.close()

    run(main)


def test_connections_from_a_removed_source_are_never_reused(frontend_bundle: CertBundle,
                                                            backend_bundle: CertBundle) -> None:
    """A pooled connection's socket belongs to its source pod's namespace: once that
    pod is gone, a new pod with the same IP and identity must get a fresh one."""
    async def main() -> None:
        app, app_address = await start_app(echo)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app_address
        try:
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            assert env.pool.connection_count() == 1
            assert env.pool.abort_from("198.18.99.99") == 0  # another source: untouched
            assert env.pool.abort_from(env.key().src_ip) == 1
            assert env.pool.connection_count() == 0
            reader, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
            writer.close()
            assert env.pool.connects_started == 2
        finally:
            await env.close()
            app.close()

    run(main)


def test_listener_aborts_the_tunnels_it_accepted(frontend_bundle: CertBundle,
                                                 backend_bundle: CertBundle) -> None:
    """What `Proxy.remove_pod` relies on: a peer's pooled connection to a removed pod
    is ended by the listener, not left open until the peer closes it. (Under the
    loop's TLS transport the listener never saw its connections: uvloop returned
    its own protocol object from connect_accepted_socket.)"""
    async def main() -> None:
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        try:
            conn = await env.connect()
            listener = env._servers[0]
            assert isinstance(listener, HboneListener)
            listener.abort_connections()
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert not conn.is_usable
        finally:
            await env.close()

    run(main)
