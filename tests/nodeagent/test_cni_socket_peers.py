"""The CNI socket, like the control socket: private from its first moment, and a peer
whose uid is not root's (or the agent's) is closed unanswered and counted, even when
the file's mode would let it connect."""

from __future__ import annotations

import asyncio
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.cni_server import CniServer
from nodeagent.redirect import PodNetwork

pytestmark = pytest.mark.netns  # root: the test connects as another uid


class NoRedirect:
    name = "none"

    def apply(self, pod: PodNetwork) -> None:
        raise AssertionError("a refused peer must not reach the redirector")

    def remove(self, pod: PodNetwork) -> None:
        raise AssertionError("a refused peer must not reach the redirector")


_CONNECT_AND_SEND = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(b"\\x00\\x00\\x00\\x02{}")
    s.shutdown(socket.SHUT_WR)
    print("answered" if s.recv(65536) else "closed")
except OSError as e:
    print("closed", e.errno)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tcni-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_a_peer_of_another_uid_is_refused_and_counted(open_dir: Path) -> None:
    path = open_dir / "cni.sock"
    server = CniServer(path, NoRedirect(), lambda: None)  # type: ignore[arg-type]

    async def connect_as(uid: int) -> str:
        done = await asyncio.create_subprocess_exec(
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "/usr/bin/python3", "-c", _CONNECT_AND_SEND, str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await done.communicate()
        assert done.returncode == 0, err.decode()
        return out.decode().strip()

    async def scenario() -> None:
        await server.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            path.chmod(0o666)  # a deployment mistake: the mode no longer protects it
            assert (await connect_as(65534)).startswith("closed")
            assert await connect_as(0) == "answered"  # the control: root is answered
        finally:
            server.close()

    asyncio.run(scenario())
    assert server.refused_peers == 1
