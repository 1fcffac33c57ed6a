"""The relay between two plain TCP endpoints, and error propagation through HBONE."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Callable

import pytest
from hbone_env import HboneEnv, client_socket, listening_socket, run

from identity.certs import CertBundle
from tunnel import relay
from tunnel.relay import TcpEndpoint, connect_tcp, splice, start_splice

pytestmark = pytest.mark.inprocess


class Accepted:
    """A listener whose accepted connections queue up as (not yet spliced) TcpEndpoints."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[TcpEndpoint] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("", 0)

    async def start(self) -> Accepted:
        sock = listening_socket()
        self.address = sock.getsockname()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: TcpEndpoint(self.queue.put_nowait), sock=sock)
        return self


def rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (a plain abort() with nothing unread sends a FIN)."""
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for a condition the relay offers no event for, failing after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def relay_pair() -> tuple[Accepted, Accepted]:
    """front: where the test's client connects; back: where the relay connects to."""
    return await Accepted().start(), await Accepted().start()


def test_reads_before_the_splice_are_held_not_lost() -> None:
    async def main() -> None:
        front, back = await relay_pair()
        reader, writer = await asyncio.open_connection(*front.address)
        writer.write(b"early bytes")
        writer.write_eof()  # even the EOF arrives before anyone splices
        downstream = await front.queue.get()
        await until(lambda: downstream.bytes_received == len(b"early bytes"), "the early bytes")
        assert downstream.transport is not None
        assert downstream.transport.get_write_buffer_limits()[1] == relay.WRITE_HIGH_WATER
        upstream = await connect_tcp(client_socket(), back.address, timeout=5)
        app = await back.queue.get()
        got: list[bytes] = []
        app.on_data = lambda data: got.append(bytes(data))
        app_eof = asyncio.Event()
        app.on_eof = app_eof.set
        app.resume_reading()
        handle = start_splice(downstream, upstream)
        await asyncio.wait_for(app_eof.wait(), 5)
        assert b"".join(got) == b"early bytes"
        app.write(b"reply after the half-close")
        app.write_eof()
        assert await reader.read() == b"reply after the half-close"
        result = await handle.wait()
        assert (result.a_to_b, result.b_to_a, result.error) == (11, 26, None)
        writer.close()
        app.close()
        for server in (front.server, back.server):
            assert server is not None
            server.close()

    run(main)


def test_abort_is_a_reset_not_an_end_of_data() -> None:
    async def main() -> None:
        front, back = await relay_pair()
        reader, writer = await asyncio.open_connection(*front.address)
        downstream = await front.queue.get()
        upstream = await connect_tcp(client_socket(), back.address, timeout=5)
        app = await back.queue.get()
        app.resume_reading()
        handle = start_splice(downstream, upstream)
        app.abort()  # the upstream application dies
        result = await asyncio.wait_for(handle.wait(), 5)
        assert result.error is not None
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        for server in (front.server, back.server):
            assert server is not None
            server.close()

    run(main)


def test_splice_of_an_endpoint_that_already_closed_finishes_at_once() -> None:
    async def main() -> None:
        front, back = await relay_pair()
        _, writer = await asyncio.open_connection(*front.address)
        downstream = await front.queue.get()
        rst(writer)
        downstream.resume_reading()  # let the loop notice the reset
        await until(lambda: downstream.is_closed, "the reset to close the endpoint")
        upstream = await connect_tcp(client_socket(), back.address, timeout=5)
        result = await asyncio.wait_for(splice(downstream, upstream), 5)
        assert result.error is not None
        assert upstream.is_closed or upstream.transport is None or upstream.transport.is_closing()
        for server in (front.server, back.server):
            assert server is not None
            server.close()

    run(main)


def test_cancelling_splice_aborts_both_sides() -> None:
    async def main() -> None:
        front, back = await relay_pair()
        reader, writer = await asyncio.open_connection(*front.address)
        downstream = await front.queue.get()
        upstream = await connect_tcp(client_socket(), back.address, timeout=5)
        app = await back.queue.get()
        arrived = asyncio.Event()
        app.on_data = lambda data: arrived.set()
        app.resume_reading()
        waiter = asyncio.ensure_future(splice(downstream, upstream))
        writer.write(b"x")  # through the splice: proof that it runs before the cancel
        await asyncio.wait_for(arrived.wait(), 5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        app.close()
        for server in (front.server, back.server):
            assert server is not None
            server.close()

    run(main)


def test_client_reset_reaches_the_app_through_the_tunnel_as_a_reset(
        frontend_bundle: CertBundle, backend_bundle: CertBundle) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        app_has_request = asyncio.Event()
        app_saw: asyncio.Future[object] = loop.create_future()

        async def app_handler(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readexactly(len(b"partial request"))
                app_has_request.set()
                app_saw.set_result(await reader.read())
            except ConnectionError as exc:
                app_saw.set_result(exc)
            writer.close()

        app = await asyncio.start_server(app_handler, "127.0.0.1", 0)
        env = await HboneEnv(frontend_bundle, backend_bundle).start()
        env.app_address = app.sockets[0].getsockname()
        try:
            _, writer = await asyncio.open_connection(*env.outbound_address)
            writer.write(b"partial request")
            await asyncio.wait_for(app_has_request.wait(), 5)  # the tunnel is up end to end
            rst(writer)  # the client dies mid-request
            result = await asyncio.wait_for(env.inbound.handles[0].wait(), 5)
            assert result.error is not None and "reset" in result.error
            assert isinstance(await asyncio.wait_for(app_saw, 5), ConnectionResetError)
        finally:
            await env.close()
            app.close()

    run(main)


def test_bulk_to_a_slow_reader_arrives_intact() -> None:
    """Reads share one buffer (`tunnel.readbuf`) and a TCP transport that cannot send
    keeps a view of it: the relay must never overwrite bytes still queued there."""
    async def main() -> None:
        front, back = await relay_pair()
        _, writer = await asyncio.open_connection(*front.address)
        downstream = await front.queue.get()
        upstream = await connect_tcp(client_socket(), back.address, timeout=5)
        app = await back.queue.get()
        handle = start_splice(downstream, upstream)
        # The app reads nothing yet, so every buffer fills up: the kernel's, then
        # the relay's transport toward the app, which pauses the other side.
        filled = asyncio.Event()
        pause_downstream = upstream.on_write_paused

        def paused() -> None:
            pause_downstream()
            filled.set()

        upstream.on_write_paused = paused
        payload = os.urandom(24 * 1024 * 1024)
        writer.write(payload)
        writer.write_eof()
        await asyncio.wait_for(filled.wait(), 10)
        assert upstream.writing_paused
        assert upstream.transport is not None
        assert upstream.transport.get_write_buffer_size() >= relay.WRITE_HIGH_WATER
        got = hashlib.sha256()
        received = 0
        done = asyncio.Event()

        def take(data: bytes | memoryview) -> None:
            nonlocal received
            got.update(data)
            received += len(data)

        app.on_data = take
        app.on_eof = done.set
        app.resume_reading()
        await asyncio.wait_for(done.wait(), 10)
        assert received == len(payload)
        assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
        app.write_eof()
        assert (await handle.wait()).error is None
        writer.close()
        app.close()
        for server in (front.server, back.server):
            assert server is not None
            server.close()

    run(main)
