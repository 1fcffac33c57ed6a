"""Envoy as the HBONE server (a waypoint's connect_terminate), Trellis as the client (root).

    client in the app pod ─TCP (captured to 15001)─▶ Trellis outbound
        ─HBONE mTLS─▶ Envoy <ip>:15008 (HTTP/2 CONNECT termination) ─TCP─▶ app in ns "envoy"

Envoy's addresses are enrolled workloads of the mesh, so Trellis tunnels to
them. One Envoy holds three listeners: the good one, one presenting another
identity than the mesh state promises, one with an expired certificate.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_env import (
    APP_IP,
    APP_PORT,
    BACKEND,
    ENVOY_EXPIRED_IP,
    ENVOY_IMPOSTOR_IP,
    ENVOY_IP,
    WAYPOINT,
    App,
    Bed,
    TrellisNode,
    app_workload,
    bed_fixture,  # noqa: F401 - a fixture: pytest finds it by its name, "bed"
    exchange,
    expired,
    pattern,
    run,
    wait_for_log,
    workload,
)

from identity.ca import CertificateAuthority
from identity.spiffe import Identity
from lab.envoy import (
    EnvoyProcess,
    hbone_server_config,
    merge_bootstraps,
    start_envoy,
    write_cert_files,
)
from tunnel.state import MeshState

pytestmark = pytest.mark.netns

ENVOY_APP = ("127.0.0.1", APP_PORT)  # the app behind Envoy, in Envoy's namespace
IMPOSTOR = Identity.of("demo", "impostor")


@pytest.fixture(scope="module")
def envoy(bed: Bed, ca: CertificateAuthority) -> Iterator[tuple[EnvoyProcess, Path]]:
    log = bed.dir / "envoy-server-access.log"
    good = write_cert_files(bed.dir, "waypoint", ca.issue(WAYPOINT))
    impostor = write_cert_files(bed.dir, "impostor", ca.issue(IMPOSTOR))
    stale = write_cert_files(bed.dir, "waypoint-expired", expired(ca, WAYPOINT))
    config = merge_bootstraps(*(
        hbone_server_config((ip, 15008), ENVOY_APP, certs, authority=f"{ip}:{APP_PORT}",
                            access_log=log, admin_port=15001, name=name)
        for name, ip, certs in (("good", ENVOY_IP, good), ("impostor", ENVOY_IMPOSTOR_IP, impostor),
                                ("expired", ENVOY_EXPIRED_IP, stale))))
    proc = start_envoy(bed.envoy_ns, config, bed.dir / "envoy-server.log")
    try:
        yield proc, log
    finally:
        proc.stop()


def _state(bed: Bed) -> MeshState:
    # All three Envoy addresses claim to be the waypoint: Trellis expects WAYPOINT
    # from each, whatever certificate the listener really presents.
    return MeshState(workloads=(
        app_workload(bed),
        workload("waypoint", ENVOY_IP, WAYPOINT, node="node-2"),
        workload("waypoint-impostor", ENVOY_IMPOSTOR_IP, WAYPOINT, node="node-2"),
        workload("waypoint-expired", ENVOY_EXPIRED_IP, WAYPOINT, node="node-2")))


def _from_app_pod(bed: Bed, ip: str, port: int = APP_PORT, upload: bytes = b"hello",
                  download: int = 5):  # type: ignore[no-untyped-def]
    return exchange(bed.app_ns, (ip, port), upload, download)


def _outbound_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.fields["error"] for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "outbound connection failed"]


def test_trellis_tunnels_to_envoy_which_sees_its_spiffe_identity_and_half_close_works(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority) -> None:
    """9 MiB up then shutdown(SHUT_WR); the app answers after EOF with 5 MiB down
    (both beyond the 4 MiB stream windows, so flow control is exercised)."""
    upload = pattern(9 * 1024 * 1024 + 11)[::-1]
    download = 5 * 1024 * 1024 + 5

    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}) as node, \
                App(bed.envoy_ns, ENVOY_APP):
            got = await _from_app_pod(bed, ENVOY_IP, upload=upload, download=download)
            assert got.report == {"peer": "127.0.0.1", "bytes": len(upload),
                                  "sha256": hashlib.sha256(upload).hexdigest()}
            assert got.download == pattern(download)
            assert node.metric("istio_tcp_connections_opened_total", reporter="source",
                               destination_principal=WAYPOINT.principal,
                               connection_security_policy="mutual_tls") == 1

    run(main())
    entry = wait_for_log(envoy[1], lambda e: e["method"] == "CONNECT"
                         and e["authority"] == f"{ENVOY_IP}:{APP_PORT}")
    assert entry["response_code"] == 200
    assert entry["downstream_peer_uri_san"] == BACKEND.uri
    assert entry["downstream_remote"].startswith(f"{APP_IP}:")
    assert entry["forwarded"] == f'for="{APP_IP}"'  # what Trellis adds to every CONNECT


def test_a_bad_authority_gets_envoys_404_and_trellis_logs_it(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}) as node, \
                App(bed.envoy_ns, ENVOY_APP):
            got = await _from_app_pod(bed, ENVOY_IP, port=9090)
            assert got.report is None
            assert node.metric("trellis_connect_failures_total", direction="outbound",
                               reason="rejected_404") == 1

    with caplog.at_level(logging.INFO):
        run(main())
    assert _outbound_failures(caplog) == ["rejected_404: demo/waypoint: HTTP 404"]
    wait_for_log(envoy[1], lambda e: e["authority"] == f"{ENVOY_IP}:9090"
                 and e["response_code"] == 404)


def test_trellis_refuses_envoy_presenting_another_identity(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}) as node, \
                App(bed.envoy_ns, ENVOY_APP):
            got = await _from_app_pod(bed, ENVOY_IMPOSTOR_IP)
            assert got.report is None
            assert node.metric("trellis_connect_failures_total", direction="outbound",
                               reason="hbone_connect_failed") == 1

    with caplog.at_level(logging.INFO):
        run(main())
    [error] = _outbound_failures(caplog)
    assert error.startswith("hbone_connect_failed: demo/waypoint-impostor:")
    assert WAYPOINT.uri in error and IMPOSTOR.uri in error


def test_trellis_refuses_an_expired_server_certificate(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}), \
                App(bed.envoy_ns, ENVOY_APP):
            got = await _from_app_pod(bed, ENVOY_EXPIRED_IP)
            assert got.report is None

    with caplog.at_level(logging.INFO):
        run(main())
    [error] = _outbound_failures(caplog)
    assert error.startswith("hbone_connect_failed: demo/waypoint-expired:")
    assert "certificate has expired" in error


def test_envoy_refuses_an_expired_client_certificate(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: expired(ca, BACKEND)}), \
                App(bed.envoy_ns, ENVOY_APP):
            got = await _from_app_pod(bed, ENVOY_IP)
            assert got.report is None

    with caplog.at_level(logging.INFO):
        run(main())
    [error] = _outbound_failures(caplog)
    assert error.startswith("hbone_connect_failed: demo/waypoint:")
    wait_for_log(envoy[1], lambda e: "certificate_has_expired" in (e["downstream_failure"] or ""))
