"""`trellis ca serve --metrics`: the CA's metrics on a plain-HTTP listener of their own,
and not on the API port (as istiod keeps 15014 apart from 15012)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from identity.node_auth import issue_node_tokens

pytestmark = pytest.mark.inprocess

START_WAIT_S = 30.0  # process start-up bound (imports, key generation); not a speed claim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    return answer


def test_ca_serve_metrics_flag(tmp_path: Path) -> None:
    workloads = tmp_path / "workloads.yaml"
    workloads.write_text("")
    issue_node_tokens(["node-1"], tmp_path / "tokens", tmp_path / "digests")
    api_port, metrics_port = _free_port(), _free_port()

    async def main() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trellis.cli", "ca", "serve", "--state-dir",
            str(tmp_path / "state"), "--listen", f"127.0.0.1:{api_port}", "--metrics",
            f"127.0.0.1:{metrics_port}", "--workloads", str(workloads), "--node-tokens",
            str(tmp_path / "digests"), stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(START_WAIT_S):
                while True:
                    assert process.returncode is None
                    try:
                        answer = await _get(metrics_port, "/metrics")
                        break
                    except OSError:
                        await asyncio.sleep(0.1)
            assert answer.startswith(b"HTTP/1.1 200")
            assert b"trellis_ca_sign_limited_total" in answer
            assert (await _get(metrics_port, "/healthz")).startswith(b"HTTP/1.1 404")
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 10)

    asyncio.run(main())


def test_a_bad_metrics_address_names_the_flag(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trellis.cli", "ca", "serve", "--state-dir",
                           str(tmp_path), "--metrics", "nowhere", "--workloads", "x",
                           "--node-tokens", "y"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--metrics: 'nowhere' is not HOST:PORT" in done.stderr
