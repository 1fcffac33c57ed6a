"""Issue 17, a surge upgrade of the node proxy: two proxies on one node hand over safely.

Proxy A serves the bed's enrolled pod, told by the agent's reconciler over the
real control socket. Proxy B starts beside it on the same socket path; the
agent moves to B and replays the pod (B binds its listeners next to A's,
``SO_REUSEPORT``). A then stops as on SIGTERM: listeners first, then a drain.
Throughout, new connections through the pod's redirection must all succeed, a
connection A holds must finish its transfer, and the path must stay B's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest
from proxy_bed import ECHO_PORT, POD_IP, Bed, ServedPod, connect, echoes, eventually, run_in_bed

from identity.certs import CertBundle
from nodeagent.agent import Reconciler
from nodeagent.iptables import IptablesRedirector
from nodeagent.objects import Snapshot
from nodeagent.pod_sysctl import enable_request_migration, request_migration_enabled
from nodeagent.proxy_link import RemoteProxy
from nodeagent.redirect import PodNetwork
from tunnel import tasks
from tunnel.control_server import ControlServer
from tunnel.netns import NetnsHandle, listen_in, socket_in
from tunnel.proxy import Proxy
from tunnel.state import MeshState

pytestmark = pytest.mark.netns

UID = "uid-backend"
LOOP_MAX = 400  # connections at most in the background loop, and 15 s at most


async def _connect_loop(bed: Bed, stop: asyncio.Event, outcomes: list[bool]) -> None:
    started = time.monotonic()
    while not stop.is_set() and len(outcomes) < LOOP_MAX and time.monotonic() - started < 15:
        try:
            outcomes.append(await echoes(bed.client_path, (POD_IP, ECHO_PORT)))
        except (OSError, TimeoutError):
            outcomes.append(False)
        await asyncio.sleep(0)


def _served_by(proxy: Proxy) -> int:
    pod = proxy.pods.get(UID)
    return 0 if pod is None else len(pod.connections)


def test_a_new_proxy_takes_the_pods_while_the_old_one_drains(
        backend_bundle: CertBundle, tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"

    async def main(bed: Bed) -> None:
        async with ServedPod(bed, backend_bundle) as a:
            old = ControlServer(path, a.proxy)
            await old.start()
            link = RemoteProxy(path, "node-1", timeout_s=5)
            agent = Reconciler("node-1", link, IptablesRedirector())
            await agent.apply_snapshot(Snapshot(MeshState(workloads=(bed.workload(),))))
            assert agent.served_count == 1 and agent.not_ready_reason() is None
            with NetnsHandle(bed.pod_path) as ns:
                assert request_migration_enabled(ns)  # set with the redirection

            # A long-lived connection through A.
            reader, writer = await connect(bed.client_path, (POD_IP, ECHO_PORT))
            writer.write(b"before\n")
            async with asyncio.timeout(3):
                assert await reader.readline() == b"before\n"
            assert _served_by(a.proxy) == 1

            stop = asyncio.Event()
            outcomes: list[bool] = []
            loop_task = tasks.spawn(_connect_loop(bed, stop, outcomes), name="connect loop")
            b_pod = ServedPod(bed, backend_bundle)  # only its Proxy: the apps are A's bed's
            new = ControlServer(path, b_pod.proxy)
            try:
                await eventually(lambda: len(outcomes) >= 5)
                await new.start()
                assert new.not_ready_reason() is not None  # A still has the pods
                await agent.reconcile()  # the timer's tick: the agent sees B's socket
                assert UID in b_pod.proxy.pods  # replayed: B's listeners are bound
                assert new.not_ready_reason() is None  # now Kubernetes may stop A
                assert new.agent_connected
                await eventually(lambda: not old.agent_connected)
                assert UID in a.proxy.pods  # A serves on until it drains
                handed_over = len(outcomes)
                await eventually(lambda: len(outcomes) >= handed_over + 5)

                # A's SIGTERM, as trellis proxy run does it: the control socket,
                # then the listeners, then the drain of what it holds.
                old.close()
                a.proxy.stop_accepting()
                assert path.stat().st_ino == new_inode(new)
                writer.write(b"during the drain\n")
                async with asyncio.timeout(3):
                    assert await reader.readline() == b"during the drain\n"
                writer.close()
                await eventually(lambda: _served_by(a.proxy) == 0)  # drained
                await a.proxy.close()
                after_a = len(outcomes)
                await eventually(lambda: len(outcomes) >= after_a + 5)
            finally:
                stop.set()
                await loop_task
            assert outcomes and all(outcomes), f"{outcomes.count(False)} of {len(outcomes)} failed"

            # The positive control: connections reach B, now that A is gone.
            reader, writer = await connect(bed.client_path, (POD_IP, ECHO_PORT))
            writer.write(b"after\n")
            async with asyncio.timeout(3):
                assert await reader.readline() == b"after\n"
            assert _served_by(b_pod.proxy) == 1
            writer.close()
            await agent.reconcile()
            assert link.connected and new.agent_connected and agent.not_ready_reason() is None
            assert path.stat().st_ino == new_inode(new)
            await link.close()
            new.close()
            await b_pod.proxy.close()
            assert not path.exists()

    run_in_bed(main)


def new_inode(server: ControlServer) -> int:
    bound = server._bound  # what the server bound, not what the path shows now
    assert bound is not None
    return bound[1]


def _queued_after_close(ns_path: str) -> tuple[int, int]:
    """Two reuseport listeners, connections queued on both, the first closed: how many
    of the connections does the second one hand out, and how many were made."""
    with NetnsHandle(ns_path) as ns:
        first = listen_in(ns, 18080, host="127.0.0.1", mark=None)
        second = listen_in(ns, 18080, host="127.0.0.1", mark=None)
        clients = []
        try:
            for _ in range(32):  # the reuseport hash spreads them over both
                client = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, mark=None)
                client.setblocking(True)
                client.connect(("127.0.0.1", 18080))
                clients.append(client)
            first.close()
            second.setblocking(False)
            accepted = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    conn, _ = second.accept()
                    conn.close()
                    accepted += 1
            return accepted, len(clients)
        finally:
            second.close()
            for client in clients:
                client.close()


def test_tcp_migrate_req_moves_the_closed_listeners_queue_to_its_sibling(
        netns: str, peer_netns: str) -> None:
    """What the sysctl the redirectors set buys: connections queued at the old proxy's
    closed listener are accepted by the new one's, not reset."""
    with NetnsHandle(f"/run/netns/{netns}") as ns:
        enable_request_migration(PodNetwork("uid", "demo/pod", f"/run/netns/{netns}",
                                            "198.18.0.1"), ns)
    accepted, made = _queued_after_close(f"/run/netns/{netns}")
    assert accepted == made
    # The control: without it, the first listener's share is lost.
    accepted, made = _queued_after_close(f"/run/netns/{peer_netns}")
    assert 0 < accepted < made
