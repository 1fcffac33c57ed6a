"""Issue 10, limits as configuration, against the real `Proxy` (root).

Each limit is set low, pushed past, and must bite: refused (RST on TCP, 503 on
HBONE) or closed, counted in its metric, while what stays under the limit keeps
working (the positive control in the same test).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from proxy_bed import (
    ECHO_PORT,
    POD_IP,
    SINK_PORT,
    Bed,
    ServedPod,
    connect,
    echoes,
    eventually,
    hbone_peer,
    refused,
    run_in_bed,
)

from identity.certs import CertBundle
from tunnel import tasks
from tunnel.hbone_io import StreamRejected
from tunnel.relay import TcpEndpoint

pytestmark = pytest.mark.netns

REFUSED = "trellis_connections_refused_total"


async def _held_echo(bed_path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A relayed connection proven live by one echo, left open."""
    reader, writer = await connect(bed_path, (POD_IP, ECHO_PORT))
    writer.write(b"hold\n")
    async with asyncio.timeout(3):
        assert await reader.readline() == b"hold\n"
    return reader, writer


def test_per_pod_limit_refuses_the_next_and_admits_again(backend_bundle: CertBundle) -> None:
    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle, max_connections_per_pod=2) as node:
            held = [await _held_echo(bed.client_path) for _ in range(2)]
            assert node.metric("trellis_connections_active", scope="busiest_pod") == 2
            assert await refused(bed.client_path, (POD_IP, ECHO_PORT))
            assert node.metric(REFUSED, direction="inbound", reason="pod_limit") == 1
            held[0][1].close()
            await eventually(lambda: node.pod.active == 1)
            assert await echoes(bed.client_path, (POD_IP, ECHO_PORT))
            held[1][1].close()
            await eventually(lambda: node.pod.active == 0)
            assert node.metric("trellis_connections_active", scope="node") == 0

    run_in_bed(main)


def test_per_node_limit_answers_503_on_hbone(backend_bundle: CertBundle,
                                             frontend_bundle: CertBundle) -> None:
    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle, max_connections_per_node=2,
                             max_connections_per_pod=2) as node, \
                hbone_peer(bed, frontend_bundle) as peer:
            assert node.metric("trellis_connections_limit", scope="node") == 2
            streams = [await peer.open_stream(f"{POD_IP}:{ECHO_PORT}", [])
                       for _ in range(2)]
            with pytest.raises(StreamRejected) as rejected:
                await peer.open_stream(f"{POD_IP}:{ECHO_PORT}", [])
            assert rejected.value.status == 503
            assert node.metric(REFUSED, direction="inbound", reason="node_limit") == 1
            streams[0].abort()
            await eventually(lambda: node.proxy.limits.active == 1)
            streams[0] = await peer.open_stream(f"{POD_IP}:{ECHO_PORT}", [])
            for stream in streams:
                stream.abort()

    run_in_bed(main)


def test_idle_relay_is_closed_and_a_busy_one_is_not(backend_bundle: CertBundle) -> None:
    idle_s = 0.4

    async def busy(writer: asyncio.StreamWriter, reader: asyncio.StreamReader) -> None:
        for _ in range(12):  # 1.2 s of traffic, three timeouts long
            writer.write(b"tick\n")
            assert await reader.readline() == b"tick\n"
            await asyncio.sleep(0.1)

    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle, relay_idle_timeout_s=idle_s) as node:
            quiet_reader, quiet = await _held_echo(bed.client_path)
            busy_reader, busy_writer = await _held_echo(bed.client_path)
            started = time.monotonic()
            ticking = tasks.spawn(busy(busy_writer, busy_reader), name="busy client")
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(3):
                    await quiet_reader.read(1)
            assert time.monotonic() - started >= idle_s * 0.9
            await ticking  # the busy one kept working past the quiet one's close
            assert node.metric("trellis_connections_idle_closed_total",
                               direction="inbound") == 1
            busy_writer.close()
            quiet.close()

    run_in_bed(main)


def test_write_high_water_caps_what_a_slow_reader_holds(backend_bundle: CertBundle) -> None:
    cap = 64 * 1024
    chunk = b"x" * (1 << 20)

    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle, relay_write_high_water_bytes=cap) as node:
            _, writer = await connect(bed.client_path, (POD_IP, SINK_PORT))
            for _ in range(32):  # past every kernel buffer on the way
                writer.write(chunk)
            await eventually(lambda: node.metric(
                "trellis_relay_write_paused_connections") == 1, timeout=10)
            assert node.metric("trellis_relay_write_pauses_total") >= 1
            (live,) = node.pod.connections
            assert live.handle is not None
            app_side = live.handle.b
            assert isinstance(app_side, TcpEndpoint) and app_side.transport is not None
            # The cap, plus at most one read (256 KiB) that arrived as it was crossed;
            # the default mark would have let 1 MiB pile up.
            assert app_side.transport.get_write_buffer_size() <= cap + 256 * 1024
            writer.transport.abort()

    run_in_bed(main)
