"""Micro benchmark of the HBONE data path on loopback, for fast iteration on tunnel/.

    iperf3 -c ─TCP─▶ outbound proxy ─HBONE (mTLS 1.3)─▶ inbound proxy ─TCP─▶ iperf3 -s
                     (process 1: TcpEndpoint ⇄ pooled stream)  (process 2: stream ⇄ TcpEndpoint)

Each proxy is its own process on its own uvloop loop, as the two node agents
are in the lab; there are no namespaces, iptables or veths, so the figures are
the tunnel's own. Prints Gbit/s and the proxies' CPU seconds per GB moved.
Confirm any gain on `trellis bench`; this only says where the tunnel stands.

    flock /tmp/trellis-bench.lock .venv/bin/python -m bench.micro_hbone --streams 1 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from multiprocessing.connection import Connection

import uvloop

from identity.ca import CertificateAuthority
from identity.certs import CertBundle
from identity.spiffe import Identity
from tunnel import tasks, tls
from tunnel.hbone_io import HboneConnection, InboundRequest, serve_hbone
from tunnel.pool import HboneConnectionPool, PoolKey
from tunnel.relay import TcpEndpoint, connect_tcp, splice

TRUST_DOMAIN = "cluster.local"
CLIENT = Identity.of("bench", "client")
SERVER = Identity.of("bench", "server")
LOOPBACK = "127.0.0.1"


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def _inbound(bundle: CertBundle, app_port: int, ready: Connection) -> None:
    async def handle(request: InboundRequest) -> None:
        try:
            upstream = await connect_tcp(_client_socket(), (LOOPBACK, app_port), timeout=5)
        except OSError:
            request.reject(503)
            return
        await splice(await request.accept(), upstream)

    sock = _listening_socket()
    port = sock.getsockname()[1]
    await serve_hbone(sock, tls.server_context(bundle), handle, trust_domain=TRUST_DOMAIN)
    ready.send(port)
    await asyncio.Event().wait()


async def _outbound(bundle: CertBundle, hbone_port: int, app_port: int,
                    ready: Connection) -> None:
    pool = HboneConnectionPool()
    ctx = tls.client_context(bundle)
    key = PoolKey(CLIENT, LOOPBACK, SERVER, (LOOPBACK, hbone_port))

    async def connect() -> HboneConnection:
        return await HboneConnection.connect(_client_socket(), (LOOPBACK, hbone_port), ctx,
                                             SERVER, trust_domain=TRUST_DOMAIN,
                                             connect_timeout=5)

    async def relay(endpoint: TcpEndpoint) -> None:
        try:
            stream = await pool.open_stream(key, connect, f"{LOOPBACK}:{app_port}", [])
        except Exception:
            endpoint.abort()
            raise
        await splice(endpoint, stream)

    sock = _listening_socket()
    loop = asyncio.get_running_loop()
    await loop.create_server(
        lambda: TcpEndpoint(lambda e: tasks.spawn(relay(e), name="micro-outbound")), sock=sock)
    ready.send(sock.getsockname()[1])
    await asyncio.Event().wait()


def _run_inbound(bundle: CertBundle, app_port: int, ready: Connection) -> None:
    uvloop.run(_inbound(bundle, app_port, ready))


def _run_outbound(bundle: CertBundle, hbone_port: int, app_port: int,
                  ready: Connection) -> None:
    uvloop.run(_outbound(bundle, hbone_port, app_port, ready))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--pin", action="store_true",
                        help="both proxies on CPU 0, iperf3 on CPU 1: Gbit/s then measures "
                             "the proxies' cost alone, with far less noise")
    parser.add_argument("--pause", action="store_true",
                        help="print the proxies' PIDs and wait for Enter before the load "
                             "(to attach py-spy)")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 60:
        parser.error("--seconds must be 1..60")

    ca = CertificateAuthority.create(trust_domain=TRUST_DOMAIN)
    client_bundle, server_bundle = ca.issue(CLIENT), ca.issue(SERVER)
    app_port = _free_port()
    iperf = ["taskset", "-c", "1", "iperf3"] if args.pin else ["iperf3"]
    iperf_server = subprocess.Popen([*iperf, "-s", "-B", LOOPBACK, "-p", str(app_port)],
                                    stdout=subprocess.DEVNULL)
    mp = multiprocessing.get_context("fork")
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        rx, tx = mp.Pipe(duplex=False)
        inbound = mp.Process(target=_run_inbound, args=(server_bundle, app_port, tx), daemon=True)
        inbound.start()
        procs.append(inbound)
        hbone_port = rx.recv()
        outbound = mp.Process(target=_run_outbound,
                              args=(client_bundle, hbone_port, app_port, tx), daemon=True)
        outbound.start()
        procs.append(outbound)
        proxy_port = rx.recv()
        pids = [p.pid for p in procs if p.pid is not None]
        if args.pin:
            for pid in pids:
                os.sched_setaffinity(pid, {0})
        if args.pause:
            input(f"proxies: outbound {outbound.pid}, inbound {inbound.pid}; Enter to start ")
        time.sleep(0.3)
        for _ in range(args.repetitions):
            for streams in args.streams:
                cpu0 = sum(_cpu_seconds(pid) for pid in pids)
                out = subprocess.run(
                    [*iperf, "-c", LOOPBACK, "-p", str(proxy_port), "-P", str(streams),
                     "-t", str(args.seconds), "-J"],
                    capture_output=True, text=True, timeout=args.seconds + 30, check=True)
                cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu0
                end = json.loads(out.stdout)["end"]["sum_received"]
                gb = end["bytes"] / 1e9
                print(f"streams={streams} gbit_s={end['bits_per_second'] / 1e9:.2f} "
                      f"cpu_s_per_gb={cpu / gb:.2f}", flush=True)
    finally:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
            proc.join(5)
        iperf_server.terminate()
        iperf_server.wait(5)


if __name__ == "__main__":
    main()
