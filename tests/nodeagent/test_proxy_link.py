"""Agent and proxy over a real control socket: SCM_RIGHTS namespace fds, acks,
refusals, a replacing connection, and a replay after a reconnect."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest

from nodeagent.proxy_link import ProxyUnavailable, RemoteProxy
from tunnel.control_server import ControlServer
from tunnel.netns import NetnsHandle
from tunnel.state import Workload

pytestmark = pytest.mark.inprocess

OWN_NETNS = "/proc/self/ns/net"


def workload(uid: str, ip: str = "198.18.1.10") -> Workload:
    return Workload(uid=uid, name=f"pod-{uid}", namespace="demo", node="node-1", ip=ip,
                    service_account="web", labels=MappingProxyType({}), enrolled=True)


class RecordingProxy:
    """Serves pods on paper: what the control server asked, and which namespace."""

    def __init__(self) -> None:
        self.pods: dict[str, tuple[int, str]] = {}
        self.refuse: str = ""

    async def add_pod(self, workload: Workload, netns: str | NetnsHandle) -> None:
        assert isinstance(netns, NetnsHandle)
        try:
            if self.refuse:
                raise OSError(f"port 15008: {self.refuse}")
            self.pods[workload.uid] = (netns.inode, netns.path)
        finally:
            netns.close()

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid, None)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_pods_arrive_with_their_namespace_and_a_replay_drops_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    proxy = RecordingProxy()

    async def scenario() -> None:
        server = ControlServer(path, proxy)
        await server.start()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        peers: list[int] = []
        agent = RemoteProxy(path, "node-1", timeout_s=5, on_connect=peers.append)
        assert await agent.connect() == 1
        assert peers == [os.getpid()]  # SO_PEERCRED: the proxy's pid, for eBPF's cgroup
        await agent.add_pod(workload("a"), OWN_NETNS)
        await agent.add_pod(workload("b", "198.18.1.11"), OWN_NETNS)
        await agent.remove_pod("b")
        await agent.add_pod(workload("c", "198.18.1.12"), OWN_NETNS)
        assert server.agent_connected
        # The agent "restarts": a new client, whose replay names only a.
        await agent.close()
        await asyncio.sleep(0.05)
        assert set(proxy.pods) == {"a", "c"}  # nothing dropped while no agent is there
        again = RemoteProxy(path, "node-1", timeout_s=5)
        assert await again.connect() == 1
        await again.add_pod(workload("a"), OWN_NETNS)
        await again.snapshot_sent()
        await again.close()
        server.close()

    before = _open_fds()
    asyncio.run(scenario())
    assert proxy.pods == {"a": (os.stat(OWN_NETNS).st_ino, OWN_NETNS)}
    assert _open_fds() == before  # every namespace fd sent was closed on both sides
    assert not path.exists()


def test_a_refusal_is_an_error_for_that_pod_and_the_link_stays(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    proxy = RecordingProxy()

    async def scenario() -> None:
        server = ControlServer(path, proxy)
        await server.start()
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        generation = await agent.connect()
        proxy.refuse = "address already in use"
        with pytest.raises(ValueError, match="add_pod demo/pod-a: port 15008: address already"):
            await agent.add_pod(workload("a"), OWN_NETNS)
        proxy.refuse = ""
        await agent.add_pod(workload("a"), OWN_NETNS)
        assert await agent.connect() == generation  # the same link: no replay needed
        with pytest.raises(OSError, match="cannot open network namespace /nonexistent"):
            await agent.add_pod(workload("b"), "/nonexistent")
        await agent.close()
        server.close()

    asyncio.run(scenario())
    assert set(proxy.pods) == {"a"}


def test_a_fd_that_is_no_network_namespace_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    proxy = RecordingProxy()
    not_a_namespace = tmp_path / "plain-file"
    not_a_namespace.write_text("")

    async def scenario() -> None:
        server = ControlServer(path, proxy)
        await server.start()
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        await agent.connect()
        with pytest.raises(ValueError, match=r"add_pod demo/pod-a: the fd sent for .*plain-file"
                                             r".*is not a network namespace"):
            await agent.add_pod(workload("a"), str(not_a_namespace))
        await agent.close()
        server.close()

    asyncio.run(scenario())
    assert proxy.pods == {}


def test_garbage_on_the_socket_gets_an_error_ack_and_the_connection_lives(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    proxy = RecordingProxy()

    async def scenario() -> None:
        server = ControlServer(path, proxy)
        await server.start()
        loop = asyncio.get_running_loop()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raw.setblocking(False)
        await loop.sock_connect(raw, str(path))
        await loop.sock_sendall(raw, b'{"type": "reboot"}')
        reply = await asyncio.wait_for(loop.sock_recv(raw, 4096), 5)
        assert b"type 'reboot' is not one of" in reply
        await loop.sock_sendall(raw, b'{"type": "snapshot_sent"}')
        assert await asyncio.wait_for(loop.sock_recv(raw, 4096), 5) == b'{"type":"ack"}'
        raw.close()
        server.close()

    asyncio.run(scenario())


def test_no_proxy_is_a_clear_error_and_a_new_proxy_is_a_new_generation(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"

    async def scenario() -> None:
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        with pytest.raises(ProxyUnavailable, match=f"proxy control socket {path}: No such file"):
            await agent.connect()
        server = ControlServer(path, RecordingProxy())
        await server.start()
        first = await agent.connect()
        server.close()  # the proxy restarts
        await asyncio.sleep(0.05)
        with pytest.raises(ProxyUnavailable):
            await agent.remove_pod("a")
        assert not agent.connected
        server = ControlServer(path, RecordingProxy())
        await server.start()
        assert await agent.connect() == first + 1
        # Restarted again, with the agent idle: connect() notices the dead link itself.
        server.close()
        await asyncio.sleep(0.05)
        server = ControlServer(path, RecordingProxy())
        await server.start()
        assert await agent.connect() == first + 2
        await agent.close()
        server.close()

    asyncio.run(scenario())


def test_an_old_proxy_stopping_leaves_the_newer_proxys_socket_in_place(tmp_path: Path) -> None:
    """A surge upgrade: the new proxy renames its socket onto the path while the old
    one runs; the old one, stopping, must not delete it (the agent would lose the
    node's proxy until the new one restarted)."""
    path = tmp_path / "proxy.sock"

    async def scenario() -> None:
        old = ControlServer(path, RecordingProxy())
        await old.start()
        new = ControlServer(path, RecordingProxy())
        await new.start()
        newest = path.stat().st_ino
        old.close()
        assert path.exists() and path.stat().st_ino == newest
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        await agent.connect()  # the path still leads to a live proxy
        await asyncio.sleep(0.05)
        assert new.agent_connected
        await agent.close()
        new.close()
        assert not path.exists()  # its own socket, it does remove (the control)

    asyncio.run(scenario())


def test_the_agent_moves_to_a_newer_proxy_and_the_old_one_keeps_its_pods(
        tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    old_pods, new_pods = RecordingProxy(), RecordingProxy()

    async def scenario() -> None:
        old = ControlServer(path, old_pods)
        await old.start()
        peers: list[int] = []
        agent = RemoteProxy(path, "node-1", timeout_s=5, on_connect=peers.append)
        first = await agent.connect()
        await agent.add_pod(workload("a"), OWN_NETNS)
        assert await agent.connect() == first  # nothing new at the path: same link
        new = ControlServer(path, new_pods)
        await new.start()
        # One stat per connect() notices the newer socket: a new generation, so
        # the reconciler replays every pod to the new proxy.
        assert await agent.connect() == first + 1
        assert peers == [os.getpid(), os.getpid()]  # eBPF follows the new proxy too
        await agent.add_pod(workload("a"), OWN_NETNS)
        await agent.snapshot_sent()
        await agent.remove_pod("a")  # later changes go to the newest proxy only
        await agent.add_pod(workload("b", "198.18.1.11"), OWN_NETNS)
        for _ in range(100):
            if not old.agent_connected:
                break
            await asyncio.sleep(0.01)
        assert not old.agent_connected and new.agent_connected
        old.close()  # the old proxy's SIGTERM
        assert await agent.connect() == first + 1  # the agent stays with the new one
        await agent.close()
        new.close()

    asyncio.run(scenario())
    assert set(old_pods.pods) == {"a"}  # served on until it drains and exits
    assert set(new_pods.pods) == {"b"}


def test_an_unusable_newer_socket_keeps_the_working_link(tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"

    async def scenario() -> None:
        server = ControlServer(path, RecordingProxy())
        await server.start()
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        first = await agent.connect()
        # A socket file nobody listens on any more (bound, then closed) replaces it.
        stray = tmp_path / "stray.sock"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        dead.bind(str(stray))
        dead.close()
        os.replace(stray, path)
        assert await agent.connect() == first  # no error, no replay
        assert agent.connected and server.agent_connected
        await agent.remove_pod("a")  # the old link still answers
        await agent.close()
        server.close()

    asyncio.run(scenario())


def test_a_proxy_started_beside_another_is_ready_only_once_the_agent_replayed(
        tmp_path: Path) -> None:
    """With maxUnavailable 0 Kubernetes stops the old proxy as soon as the new one is
    ready: before the agent has handed it the pods, their connections would fail."""
    path = tmp_path / "proxy.sock"

    async def scenario() -> None:
        old = ControlServer(path, RecordingProxy())
        assert old.not_ready_reason() == "control socket not open yet"
        await old.start()
        assert old.not_ready_reason() is None  # a first install: nothing to take over
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        await agent.connect()
        await agent.add_pod(workload("a"), OWN_NETNS)
        new = ControlServer(path, RecordingProxy())
        await new.start()
        assert "waiting for the agent to hand this node's pods over" in str(
            new.not_ready_reason())
        await agent.connect()  # moves to the new proxy
        await agent.add_pod(workload("a"), OWN_NETNS)
        assert new.not_ready_reason() is not None  # one pod told, the replay not ended
        await agent.snapshot_sent()
        assert new.not_ready_reason() is None
        old.close()
        await agent.close()
        new.close()

    asyncio.run(scenario())


def test_a_socket_file_deleted_by_someone_else_is_bound_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An old proxy from a release that unlinked the path unconditionally deletes the
    new proxy's socket when it stops; the new one must become reachable again."""
    import tunnel.control_server as control_server

    monkeypatch.setattr(control_server, "PATH_CHECK_S", 0.01)
    path = tmp_path / "proxy.sock"

    async def until(check: Callable[[], bool]) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("not within 5 s")

    async def scenario() -> None:
        server = ControlServer(path, RecordingProxy())
        await server.start()
        agent = RemoteProxy(path, "node-1", timeout_s=5)
        first = await agent.connect()
        path.unlink()
        await until(path.exists)
        assert await agent.connect() == first + 1  # a new socket file: a new link
        await until(lambda: server.agent_connected)
        # A newer proxy's socket at the path is left alone (the control).
        newer = ControlServer(path, RecordingProxy())
        await newer.start()
        taken = path.stat().st_ino
        await asyncio.sleep(0.1)  # ten check periods of the older server
        assert path.stat().st_ino == taken
        await agent.close()
        server.close()
        newer.close()

    asyncio.run(scenario())
