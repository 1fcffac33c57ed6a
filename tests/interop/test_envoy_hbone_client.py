"""Envoy as the HBONE client, Trellis as the server (root: namespaces, Envoy, iptables).

    test client ─TCP─▶ Envoy (tcp_proxy + tunneling_config, ns "envoy")
                ─HBONE mTLS─▶ Trellis inbound 15008 (in the app pod) ─TCP─▶ app

One Envoy holds one listener per case (lab.envoy.merge_bootstraps), each with
its own upstream cluster: the good path, a spoofed ``forwarded`` header, a bad
``:authority``, a server SAN Envoy does not expect, an expired client cert.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from interop_env import (
    APP_IP,
    APP_PORT,
    BACKEND,
    ENVOY_CLIENT,
    ENVOY_IP,
    RESET_REQUEST,
    SPOOFED_IP,
    App,
    Bed,
    Exchange,
    TrellisNode,
    app_workload,
    bed_fixture,  # noqa: F401 - a fixture: pytest finds it by its name, "bed"
    exchange,
    expired,
    pattern,
    policies,
    run,
    send_then_reset,
    wait_for_log,
    workload,
)

from identity.ca import CertificateAuthority
from identity.spiffe import Identity
from lab.envoy import (
    EnvoyProcess,
    hbone_client_config,
    merge_bootstraps,
    start_envoy,
    write_cert_files,
)
from tunnel.state import MeshState

pytestmark = pytest.mark.netns

PORTS = {"good": 15101, "spoof": 15102, "bad_authority": 15103, "wrong_san": 15104,
         "expired": 15105}


@pytest.fixture(scope="module")
def envoy(bed: Bed, ca: CertificateAuthority) -> Iterator[tuple[EnvoyProcess, Path]]:
    certs = write_cert_files(bed.dir, "envoy-client", ca.issue(ENVOY_CLIENT))
    stale = write_cert_files(bed.dir, "envoy-client-expired", expired(ca, ENVOY_CLIENT))
    log = bed.dir / "envoy-client-access.log"

    def case(name: str, *, authority: str = f"{APP_IP}:{APP_PORT}", san: str = BACKEND.uri,
             headers: tuple[tuple[str, str], ...] = (), cert=certs):  # type: ignore[no-untyped-def]
        return hbone_client_config(("127.0.0.1", PORTS[name]), (APP_IP, 15008), authority,
                                   cert, expected_server_san=san, extra_headers=headers,
                                   access_log=log, name=name)

    config = merge_bootstraps(
        case("good"),
        case("spoof", headers=(("forwarded", f'for="{SPOOFED_IP}"'),)),
        case("bad_authority", authority=f"{SPOOFED_IP}:{APP_PORT}"),
        case("wrong_san", san=Identity.of("demo", "someone-else").uri),
        case("expired", cert=stale))
    proc = start_envoy(bed.envoy_ns, config, bed.dir / "envoy-client.log")
    try:
        yield proc, log
    finally:
        proc.stop()


def _state(bed: Bed) -> MeshState:
    # Envoy's pod is a workload of the mesh on another node: its IP, its identity.
    return MeshState(workloads=(
        app_workload(bed), workload("envoy-client", ENVOY_IP, ENVOY_CLIENT, node="node-2")))


def _via(bed: Bed, case: str, upload: bytes = b"hello", download: int = 5):  # type: ignore[no-untyped-def]
    return exchange(bed.envoy_ns, ("127.0.0.1", PORTS[case]), upload, download)


def test_envoy_reaches_the_app_which_sees_envoys_own_ip_and_half_close_works(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority) -> None:
    """A 9 MiB upload, then shutdown(SHUT_WR): the tail and the 5 MiB answer arrive.

    Both exceed the 4 MiB stream windows each side advertises, so both sides'
    WINDOW_UPDATEs (and Envoy's 16 KiB frames into our 64 KiB limit) are exercised.
    """
    upload = pattern(9 * 1024 * 1024 + 7)[::-1]
    download = 5 * 1024 * 1024 + 3

    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}) as node, \
                App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "good", upload, download)
            assert got.report == {"peer": ENVOY_IP, "bytes": len(upload),
                                  "sha256": hashlib.sha256(upload).hexdigest()}
            assert got.download == pattern(download)
            assert node.metric("istio_tcp_connections_opened_total", reporter="destination",
                               source_principal=ENVOY_CLIENT.principal,
                               source_workload="envoy-client",
                               connection_security_policy="mutual_tls") == 1

    run(main())
    header = len(f"{download}\n")
    wait_for_log(envoy[1], lambda e: e["bytes_received"] == len(upload) + header
                 and e["upstream_peer_uri_san"] == BACKEND.uri)


DENY_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: backend}}}}
  action: DENY
  rules:
  - from:
    - source: {{ipBlocks: ["{ip}/32"]}}
"""


def test_a_spoofed_forwarded_header_changes_neither_the_source_ip_nor_policy(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    """Envoy's identity is no waypoint, so `forwarded: for=<spoofed>` is ignored."""
    deny_spoofed = policies(DENY_YAML.format(name="deny-spoofed", ip=SPOOFED_IP))
    deny_envoy = policies(DENY_YAML.format(name="deny-envoy", ip=ENVOY_IP))

    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)},
                               deny_spoofed) as node, App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "spoof")
            assert got.report is not None and got.report["peer"] == ENVOY_IP
            node.proxy.update_policies(deny_envoy)
            refused = await _via(bed, "spoof")
            assert refused.report is None
            assert node.metric("trellis_policy_denials_total", policy="demo/deny-envoy") == 1
            assert node.metric("trellis_policy_denials_total", policy="demo/deny-spoofed") == 0

    with caplog.at_level(logging.INFO):
        run(main())
    wait_for_log(envoy[1], lambda e: e["upstream_failure"] == "tunnel_response:401")
    denied = [r.fields for r in caplog.records if r.getMessage() == "connection closed"  # type: ignore[attr-defined]
              and getattr(r, "fields", {}).get("policy") == "demo/deny-envoy"]
    assert denied and denied[0]["src_addr"].startswith(f"{ENVOY_IP}:")


def test_a_bad_authority_is_answered_400_and_logged(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}) as node, \
                App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "bad_authority")
            assert got.report is None
            assert node.metric("trellis_connect_failures_total", direction="inbound",
                               reason="bad_authority") == 1

    with caplog.at_level(logging.INFO):
        run(main())
    rejected = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "rejected CONNECT for another target"]
    assert rejected == [{"pod": "demo/backend", "authority": f"{SPOOFED_IP}:{APP_PORT}",
                         "peer": ENVOY_CLIENT.uri, "status": 400}]
    # Envoy's side: the tunnel was refused with the status Trellis sent.
    wait_for_log(envoy[1], lambda e: e["upstream_failure"] == "tunnel_response:400")


def test_envoy_refuses_a_server_with_another_identity(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}), \
                App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "wrong_san")
            assert got.report is None

    run(main())
    wait_for_log(envoy[1], lambda e: "SAN_matcher" in (e["upstream_failure"] or "")
                 and BACKEND.uri in e["upstream_failure"])


def test_envoy_refuses_an_expired_server_certificate(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: expired(ca, BACKEND)}), \
                App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "good")
            assert got.report is None

    run(main())
    wait_for_log(envoy[1], lambda e: "certificate_has_expired" in (e["upstream_failure"] or ""))


def test_trellis_refuses_an_expired_client_certificate(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority,
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}), \
                App(bed.app_ns, (APP_IP, APP_PORT)):
            got = await _via(bed, "expired")
            assert got.report is None

    with caplog.at_level(logging.INFO):
        run(main())
    refused = [r.fields for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage().startswith("refused HBONE connection from")]
    assert len(refused) == 1, refused
    assert refused[0]["peer_address"].startswith(f"('{ENVOY_IP}', ")
    assert refused[0]["error"] == "tls handshake: certificate has expired"


def test_a_reset_crosses_envoy_and_trellis_in_both_directions(
        bed: Bed, envoy: tuple[EnvoyProcess, Path], ca: CertificateAuthority) -> None:
    """Client RST → Envoy's RST_STREAM → Trellis resets the app's connection (RST).
    App RST → Trellis's RST_STREAM(CONNECT_ERROR) → Envoy, which ends its client
    connection with a FIN, not a RST: Envoy's tcp_proxy does not carry a reset
    downstream (ARCHITECTURE.md, "HBONE interoperability with Envoy")."""
    proc = envoy[0]
    sent_before = proc.stat("cluster.good_upstream.http2.tx_reset")
    received_before = proc.stat("cluster.good_upstream.http2.rx_reset")

    async def main() -> tuple[str, Exchange]:
        async with TrellisNode(bed, _state(bed), {BACKEND: ca.issue(BACKEND)}), \
                App(bed.app_ns, (APP_IP, APP_PORT)) as app:
            await send_then_reset(bed.envoy_ns, ("127.0.0.1", PORTS["good"]),
                                  b"100\n" + b"x" * 1000)
            async with asyncio.timeout(5):
                app_end = await app.ends.get()
            back = await _via(bed, "good", RESET_REQUEST, -1)
            return app_end, back

    app_end, back = run(main())
    assert proc.stat("cluster.good_upstream.http2.tx_reset") == sent_before + 1
    assert app_end == "reset"
    assert proc.stat("cluster.good_upstream.http2.rx_reset") == received_before + 1
    assert back.report is None and back.download == b""
