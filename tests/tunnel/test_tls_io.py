"""TLS on the socket (`tunnel.tls_io`) and the shared receive buffer (`tunnel.readbuf`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl

import pytest
from hbone_env import client_socket, listening_socket, run

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.spiffe import Identity
from tunnel import readbuf, tls, tls_io

pytestmark = pytest.mark.inprocess


class Recorder:
    """A TlsProtocol that hashes what it receives and records what happened to it."""

    def __init__(self) -> None:
        self.transport: tls_io.TlsTransport | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.events: list[str] = []
        self.lost: asyncio.Future[BaseException | None] = \
            asyncio.get_running_loop().create_future()

    def connection_made(self, transport: tls_io.TlsTransport) -> None:
        self.transport = transport

    def data_received(self, data: memoryview) -> None:
        self.digest.update(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


async def tls_pair(client_bundle: CertBundle, server_bundle: CertBundle
                   ) -> tuple[Recorder, Recorder]:
    loop = asyncio.get_running_loop()
    listener = listening_socket()
    sock = client_socket()
    connecting = loop.create_task(loop.sock_connect(sock, listener.getsockname()))
    accepted, _ = await loop.sock_accept(listener)
    await connecting
    listener.close()
    server_side, client_side = await asyncio.gather(
        tls_io.handshake(accepted, tls.server_context(server_bundle), server_side=True,
                         timeout=5),
        tls_io.handshake(sock, tls.client_context(client_bundle), server_side=False,
                         timeout=5))
    client, server = Recorder(), Recorder()
    tls_io.TlsTransport(loop, client_side, client)
    tls_io.TlsTransport(loop, server_side, server)
    return client, server


def test_bulk_through_a_full_socket_arrives_intact_with_back_pressure(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    """The receiver stops reading, so SSL_write meets a full socket mid-record and must
    be retried with the same bytes; nothing may be lost, doubled or reordered."""
    async def main() -> None:
        client, server = await tls_pair(frontend_bundle, backend_bundle)
        assert client.transport is not None and server.transport is not None
        client.transport.set_write_buffer_limits(high=256 * 1024)
        server.transport.pause_reading()
        sent = hashlib.sha256()
        total = 0
        buffer = bytearray(100_003)  # odd size: records never line up with writes
        for i in range(120):
            buffer[:] = os.urandom(len(buffer))
            client.transport.write(buffer)  # the caller reuses its buffer at once
            sent.update(buffer)
            total += len(buffer)
            if i == 60:
                assert "pause" in client.events
                assert client.transport.get_write_buffer_size() > 0
                server.transport.resume_reading()
            await asyncio.sleep(0)
        while server.received < total:
            await asyncio.sleep(0.01)
        assert server.digest.hexdigest() == sent.hexdigest()
        assert client.events == ["pause", "resume"]
        client.transport.close()
        assert await asyncio.wait_for(server.lost, 5) is None
        assert server.events == ["eof", "lost"]
        await client.lost

    run(main)


def test_a_peer_that_does_not_read_stops_our_reading_until_our_queue_drains(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    """Issue 10: a peer that sends and never reads made the queue of our answers grow
    without end, because we kept reading. Past the read limit we stop reading."""
    async def main() -> None:
        client, server = await tls_pair(frontend_bundle, backend_bundle)
        assert client.transport is not None and server.transport is not None
        server.transport.set_write_buffer_limits(high=256 * 1024)
        server.transport.set_read_limit(512 * 1024)
        client.transport.write(b"a" * 1000)  # positive control: the server reads
        async with asyncio.timeout(5):
            while server.received < 1000:
                await asyncio.sleep(0.01)
        client.transport.pause_reading()
        payload = os.urandom(8 * 1024 * 1024)
        server.transport.write(payload)
        assert server.transport.get_write_buffer_size() > 512 * 1024
        assert server.transport.reading_held
        client.transport.write(b"b" * 5000)
        await asyncio.sleep(0.2)  # a non-event: nothing may arrive while the hold lasts
        assert server.received == 1000
        client.transport.resume_reading()  # the peer reads again: so do we
        async with asyncio.timeout(5):
            while client.received < len(payload) or server.received < 6000:
                await asyncio.sleep(0.01)
        assert not server.transport.reading_held
        assert server.events == ["pause", "resume"]
        client.transport.close()
        await asyncio.wait_for(server.lost, 5)
        await client.lost

    run(main)


def test_close_flushes_what_is_queued_before_close_notify(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    async def main() -> None:
        client, server = await tls_pair(frontend_bundle, backend_bundle)
        assert client.transport is not None and server.transport is not None
        server.transport.pause_reading()
        payload = os.urandom(8 * 1024 * 1024)
        client.transport.write(payload)
        assert client.transport.get_write_buffer_size() > 0  # the socket is full
        client.transport.close()
        assert client.transport.is_closing()
        client.transport.write(b"after close")  # dropped, not an error
        server.transport.resume_reading()
        assert await asyncio.wait_for(server.lost, 5) is None
        assert server.received == len(payload)
        assert server.digest.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert await client.lost is None

    run(main)


def test_abort_drops_queued_bytes_and_the_peer_sees_the_end(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    async def main() -> None:
        client, server = await tls_pair(frontend_bundle, backend_bundle)
        assert client.transport is not None
        client.transport.abort()
        assert await client.lost is None
        await asyncio.wait_for(server.lost, 5)
        assert server.received == 0

    run(main)


def test_a_refused_handshake_raises_with_the_reason_and_closes_the_socket(
        backend_bundle: CertBundle, other_ca: CertificateAuthority) -> None:
    stranger = other_ca.issue(Identity.of("default", "stranger", "other.example"))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = listening_socket()
        sock = client_socket()
        connecting = loop.create_task(loop.sock_connect(sock, listener.getsockname()))
        accepted, _ = await loop.sock_accept(listener)
        await connecting
        listener.close()
        server = loop.create_task(tls_io.handshake(
            accepted, tls.server_context(backend_bundle), server_side=True, timeout=5))
        client = loop.create_task(tls_io.handshake(
            sock, tls.client_context(stranger), server_side=False, timeout=5))
        # Each side trusts only its own root: the client refuses the server's chain
        # (and says why), the server hears the client's alert. Both sockets are closed.
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            await client
        assert refused.value.verify_message
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
            await server
        assert sock.fileno() == -1 and accepted.fileno() == -1

    run(main)


def test_the_receive_buffer_is_never_reused_while_a_view_of_it_lives() -> None:
    first = readbuf.take()
    assert readbuf.take() is first  # consumed: reused
    queued = memoryview(first)[10:20]  # e.g. a slice a TCP transport still holds
    before = bytes(queued)
    second = readbuf.take()
    assert second is not first
    second[10:20] = b"x" * 10  # the next read cannot touch the queued bytes
    assert bytes(queued) == before
    del queued
    assert readbuf.take() is second
    assert len(second) == readbuf.SIZE
