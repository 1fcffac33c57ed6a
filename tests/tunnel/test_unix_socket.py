"""The control socket is private from its first moment, and takes only allowed peers.

The permission test watches every ``chmod`` while the socket is made: the old
way (bind at the final path, chmod after) leaves the final path reachable with
the umask's mode in between. The peer test opens the file's mode on purpose and
connects as uid 65534: ``SO_PEERCRED`` must still turn it away, and count it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import CollectorRegistry

from tunnel.control import Hello, encode
from tunnel.control_server import ControlServer
from tunnel.netns import NetnsHandle
from tunnel.state import Workload
from tunnel.unix_socket import bind_private_unix_socket, peer_credentials, peer_refusal


class NoPods:
    pods: MappingProxyType[str, object] = MappingProxyType({})

    async def add_pod(self, workload: Workload, netns: str | NetnsHandle) -> None:
        raise AssertionError("a refused peer must not reach the proxy")

    async def remove_pod(self, uid: str) -> None:
        raise AssertionError("a refused peer must not reach the proxy")


@pytest.mark.inprocess
def test_the_socket_file_is_never_reachable_with_a_wider_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run" / "proxy.sock"
    seen: list[str] = []
    real_chmod = os.chmod

    def watching_chmod(target, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        if path.exists():  # the final path must never be wider than 0600
            seen.append(oct(path.stat().st_mode & 0o777))
        staged_dir = Path(target).parent
        seen.append(f"staged in {oct(staged_dir.stat().st_mode & 0o777)}")
        return real_chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", watching_chmod)
    old_umask = os.umask(0o022)  # the usual umask: a plain bind would make it 0755
    try:
        server = ControlServer(path, NoPods())
        asyncio.run(_start_and_close(server, path))
    finally:
        os.umask(old_umask)
    assert seen == ["staged in 0o700"]


async def _start_and_close(server: ControlServer, path: Path) -> None:
    await server.start()
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["proxy.sock"]  # no staging left
    server.close()


@pytest.mark.inprocess
def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "cni.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with bind_private_unix_socket(path) as sock:
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        conn, _ = sock.accept()
        with client, conn:
            assert peer_credentials(conn).pid == os.getpid()
            assert peer_refusal(conn, {os.geteuid()}) is None
            assert "is not one of [12345]" in (peer_refusal(conn, {12345}) or "")


_CONNECT_AND_SAY_HELLO = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(3)
try:
    s.send(bytes.fromhex(sys.argv[2]))
    print("answered" if s.recv(4096) else "closed")
except OSError as e:
    print("closed", e.errno)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid may enter (pytest's tmp_path sits in a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="trellis-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.netns  # root: the test connects as another uid
def test_a_peer_with_another_uid_is_refused_and_counted_even_if_the_mode_allows_it(
        open_dir: Path) -> None:
    path = open_dir / "proxy.sock"
    registry = CollectorRegistry()

    async def scenario() -> None:
        server = ControlServer(path, NoPods(), registry=registry)
        await server.start()
        path.chmod(0o666)  # a mistake in the deployment: the mode no longer protects it
        try:
            async def connect_as(uid: int) -> str:
                done = await asyncio.create_subprocess_exec(
                    "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                    "/usr/bin/python3", "-c", _CONNECT_AND_SAY_HELLO, str(path),
                    encode(Hello("evil")).hex(),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await done.communicate()
                assert done.returncode == 0, err.decode()
                return out.decode().strip()

            assert (await connect_as(65534)).startswith("closed")
            # The control: the same client as root is answered.
            assert await connect_as(0) == "answered"
        finally:
            server.close()

    asyncio.run(scenario())
    assert registry.get_sample_value("trellis_control_peers_refused_total") == 1.0
