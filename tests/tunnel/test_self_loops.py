"""Issue 10, finding 1: the proxy never connects to its own listeners (root).

Each test is the review's proof of concept against the real `Proxy` in a private
pair of namespaces (tests/tunnel/proxy_bed.py). Before the fix, one SYN to
``pod-ip:15006`` made a chain of hundreds of relays through the proxy's own
listeners within half a second, until it ran out of fds. Here each attack must
end at once with a refusal: no relay opened (`istio_tcp_connections_opened_total`
unchanged), no connection left live, the proxy's fds back where they were, the
refusal counted by reason, and a legitimate connection still served.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import FRONTEND
from proxy_bed import (
    CLIENT_IP,
    ECHO_PORT,
    POD_IP,
    Bed,
    ServedPod,
    echoes,
    eventually,
    hbone_peer,
    open_fds,
    refused,
    run_in_bed,
)

from identity.certs import CertBundle
from tunnel.hbone_io import StreamRejected

pytestmark = pytest.mark.netns

OWN_PORTS = (15001, 15006, 15008, 15020, 15021)
# The proxy's own fds may differ by a few after an attack (the loop's self-pipe,
# a lazily opened namespace handle); a relay chain holds hundreds.
FD_SLACK = 4
OPENED = "istio_tcp_connections_opened_total"
REFUSED = "trellis_connections_refused_total"


def _settled(node: ServedPod, fds: int) -> bool:
    return node.live() == 0 and node.pod.active == 0 and open_fds() <= fds + FD_SLACK


def test_plaintext_to_an_own_port_is_refused_not_looped(backend_bundle: CertBundle) -> None:
    """From an unenrolled client: pod-ip:15006 (not redirected, so the original
    destination is the listener itself), and pod-ip:15001 and :15020, which the pod's
    rules redirect to 15006 with an own port as the target."""
    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle) as node:
            fds = open_fds()
            for port in (15006, 15001, 15020):
                assert await refused(bed.client_path, (POD_IP, port)), port
                assert node.metric(OPENED) == 0, f"a relay was opened for :{port}"
                await eventually(lambda: _settled(node, fds))
            assert node.metric(REFUSED, direction="inbound", reason="own_port") == 3
            # Positive control: the same client, the app's port, through 15006.
            assert await echoes(bed.client_path, (POD_IP, ECHO_PORT))
            assert node.metric(OPENED) == 1

    run_in_bed(main)


def test_the_app_dialling_15001_itself_is_refused(backend_bundle: CertBundle) -> None:
    """Inside the pod: 127.0.0.1:15001 and pod-ip:15001 are never redirected, so only
    a direct dial reaches 15001 with them as the original destination."""
    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle) as node:
            fds = open_fds()
            for target, reason in (("127.0.0.1", "loopback"), (POD_IP, "own_pod")):
                assert await refused(bed.pod_path, (target, 15001)), target
                assert node.metric(OPENED) == 0, f"a relay was opened for {target}"
                await eventually(lambda: _settled(node, fds))
                assert node.metric(REFUSED, direction="outbound", reason=reason) == 1
            # Positive control: the app's connection out of the pod, captured on
            # 15001 and passed through to the unenrolled client's echo app.
            assert await echoes(bed.pod_path, (CLIENT_IP, ECHO_PORT))
            assert node.metric(OPENED, reporter="source") == 1

    run_in_bed(main)


def test_hbone_connect_to_an_own_port_is_refused(backend_bundle: CertBundle,
                                                 frontend_bundle: CertBundle) -> None:
    """An authenticated peer asking for pod-ip:<each own port> gets 400, and no
    connection is made; CONNECT to the app's port on the same tunnel still works."""
    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle) as node, \
                hbone_peer(bed, frontend_bundle) as peer:
            fds = open_fds()
            for port in OWN_PORTS:
                with pytest.raises(StreamRejected) as rejected:
                    await peer.open_stream(f"{POD_IP}:{port}", [])
                assert rejected.value.status == 400, port
                assert node.metric(OPENED) == 0, f"a relay was opened for :{port}"
                await eventually(lambda: _settled(node, fds))
            assert node.metric(REFUSED, direction="inbound",
                               reason="own_port") == len(OWN_PORTS)
            stream = await peer.open_stream(f"{POD_IP}:{ECHO_PORT}", [])
            received = bytearray()
            stream.on_data = received.extend
            stream.resume_reading()
            stream.write(b"ping\n")
            await eventually(lambda: bytes(received) == b"ping\n")
            assert node.metric(OPENED, source_principal=FRONTEND.principal) == 1
            stream.abort()

    run_in_bed(main)


def test_a_flood_of_loop_attempts_leaves_the_proxy_serving(
        backend_bundle: CertBundle, caplog: pytest.LogCaptureFixture) -> None:
    """Fifty attempts at once on 15006: each is refused and counted, but logged at
    most once (a peer must not be able to fill the disk); the fd count returns to
    where it was, and the app is still reachable through the proxy."""
    caplog.set_level(logging.INFO, logger="trellis.tunnel.refused")

    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle) as node:
            fds = open_fds()
            results = await asyncio.gather(
                *(refused(bed.client_path, (POD_IP, 15006)) for _ in range(50)))
            assert all(results)
            assert node.metric(OPENED) == 0
            await eventually(lambda: _settled(node, fds))
            assert node.metric(REFUSED, reason="own_port") == 50
            assert await echoes(bed.client_path, (POD_IP, ECHO_PORT))

    run_in_bed(main)
    lines = [r for r in caplog.records if r.name == "trellis.tunnel.refused"]
    assert len(lines) <= 1, f"{len(lines)} log lines for 50 refusals"
