"""The peer proxies each scenario routes through, started for one run and stopped by pid.

* ``stunnel``: a client stunnel in the client pod (accepts plaintext on
  127.0.0.1, sidecar-style) and a server stunnel in the server pod, mTLS 1.3
  between them, a client certificate required, one service per target port.
* ``envoy``: the same two places, configured by ``lab.envoy`` as Istio does:
  client-side ``tcp_proxy`` with ``tunneling_config`` (HBONE origination, one
  CONNECT stream per TCP connection over pooled HTTP/2 mTLS connections),
  server-side ``connect_terminate`` on the server pod's 15008.

Both carry the bench's two targets, iperf3 and the HTTP server; the client
reaches target port P on 127.0.0.1 at ``local_port(scenario, P)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.certs import PeerCerts
from bench.procs import Started, wait_port
from lab import envoy as lab_envoy

HBONE_PORT = 15008
STUNNEL_OFFSET = 20000  # stunnel: client 127.0.0.1:2xxxx, server pod_ip:3xxxx
ENVOY_OFFSET = 40000  # envoy client: 127.0.0.1:4xxxx
ENVOY_CONCURRENCY = 2  # Istio's sidecar default (proxy.istio.io/config concurrency: 2)
READY_SECONDS = 15.0


def local_port(scenario: str, target_port: int) -> int:
    """Where the client dials on 127.0.0.1 to reach ``target_port`` through a peer pair."""
    return target_port + {"stunnel": STUNNEL_OFFSET, "envoy": ENVOY_OFFSET}[scenario]


def stunnel_config(*, client: bool, services: Sequence[tuple[str, int, str]],
                   cert: Path, key: Path, ca: Path) -> str:
    """An stunnel4 configuration; ``services`` are (name, accept port, connect host:port).

    Foreground, no pid file and logs to stderr: the bench owns the process.
    ``verifyChain`` on both sides, so the server requires a client certificate.
    """
    lines = ["foreground = yes", "pid =", "syslog = no", "debug = 4", ""]
    for name, accept_port, connect in services:
        accept = f"127.0.0.1:{accept_port}" if client else str(accept_port)
        lines += [f"[{name}]", f"client = {'yes' if client else 'no'}", f"accept = {accept}",
                  f"connect = {connect}", f"cert = {cert}", f"key = {key}", f"CAfile = {ca}",
                  "verifyChain = yes", "sslVersionMin = TLSv1.3", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class PeerPair:
    pids: tuple[int, ...]


def start_stunnel(started: Started, workdir: Path, certs: PeerCerts, client_netns: str,
                  server_netns: str, server_ip: str, targets: Sequence[int]) -> PeerPair:
    server = [(f"t{p}", p + STUNNEL_OFFSET + 10000, f"127.0.0.1:{p}") for p in targets]
    client = [(f"t{p}", local_port("stunnel", p), f"{server_ip}:{p + STUNNEL_OFFSET + 10000}")
              for p in targets]
    procs = []
    for side, netns, services, leaf in (("server", server_netns, server, certs.server),
                                        ("client", client_netns, client, certs.client)):
        conf = workdir / f"stunnel-{side}.conf"
        conf.write_text(stunnel_config(client=side == "client", services=services,
                                       cert=leaf.cert, key=leaf.key, ca=certs.ca))
        procs.append(started.spawn(netns, ["stunnel4", str(conf)],
                                   workdir / f"stunnel-{side}.log"))
    for p in targets:
        wait_port(client_netns, "127.0.0.1", local_port("stunnel", p), READY_SECONDS)
    return PeerPair(tuple(p.pid for p in procs))


def envoy_configs(certs: PeerCerts, server_ip: str,
                  targets: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(client, server) bootstraps: lab.envoy's one-target configs, merged per target."""
    client_paths = lab_envoy.CertPaths(certs.client.cert, certs.client.key, certs.ca)
    server_paths = lab_envoy.CertPaths(certs.server.cert, certs.server.key, certs.ca)
    client: dict[str, Any] | None = None
    for port in targets:
        one = lab_envoy.hbone_client_config(
            ("127.0.0.1", local_port("envoy", port)), (server_ip, HBONE_PORT),
            f"{server_ip}:{port}", client_paths, expected_server_san=certs.server.spiffe_id)
        listener = one["static_resources"]["listeners"][0]
        listener["name"] = f"hbone_originate_{port}"
        if client is None:
            client = one
        else:  # the cluster (the peer's 15008 pool) is the same: share it, as Istio does
            client["static_resources"]["listeners"].append(listener)
    server: dict[str, Any] | None = None
    for port in targets:
        one = lab_envoy.hbone_server_config((server_ip, HBONE_PORT), ("127.0.0.1", port),
                                            server_paths, authority=f"{server_ip}:{port}")
        cluster = one["static_resources"]["clusters"][0]
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"app_{port}"
        hcm = one["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        host = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
        host["name"] = f"tunnel_{port}"
        host["routes"][0]["route"]["cluster"] = f"app_{port}"
        if server is None:
            server = one
        else:  # one connect_terminate listener; routes pick the target by :authority
            server["static_resources"]["clusters"].append(cluster)
            first = server["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            first["typed_config"]["route_config"]["virtual_hosts"].append(host)
    assert client is not None and server is not None
    return client, server


def start_envoy(started: Started, workdir: Path, certs: PeerCerts, client_netns: str,
                server_netns: str, server_ip: str, targets: Sequence[int]) -> PeerPair:
    # Started here rather than with lab.envoy.start_envoy: its readiness check
    # compares the admin body to "LIVE", but Envoy answers /ready chunked even to
    # HTTP/1.0, so that check never passes (reported). A listening port is
    # readiness enough for the bench.
    client_conf, server_conf = envoy_configs(certs, server_ip, targets)
    binary = str(lab_envoy.envoy_binary())
    pids = []
    for side, netns, conf in (("server", server_netns, server_conf),
                              ("client", client_netns, client_conf)):
        path = workdir / f"envoy-{side}.json"
        path.write_text(json.dumps(conf, indent=1))
        proc = started.spawn(netns, [binary, "-c", str(path), "--concurrency",
                                     str(ENVOY_CONCURRENCY), "--log-level", "warning",
                                     "--disable-hot-restart"], workdir / f"envoy-{side}.log")
        pids.append(proc.pid)
    wait_port(server_netns, server_ip, HBONE_PORT, READY_SECONDS)
    for port in targets:
        wait_port(client_netns, "127.0.0.1", local_port("envoy", port), READY_SECONDS)
    return PeerPair(tuple(pids))
