"""`trellis ca serve --source kubernetes --root-configmap NAME`, as the chart runs it:
the CA process itself publishes its trust bundle to every namespace and counts it
on its monitoring port."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from fake_apiserver import CONFIGMAPS, FakeApiServer
from k8s_support import NAMESPACES, namespace, write_kubeconfig

from identity.ca import CertificateAuthority

pytestmark = pytest.mark.inprocess

START_WAIT_S = 30.0  # process start-up bound (imports, first lists); not a speed claim
NAME = "trellis-ca-root-cert"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    return answer.decode()


def test_the_ca_process_publishes_its_bundle_everywhere(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    metrics_port = free_port()

    def published(api: FakeApiServer) -> dict[str, str]:
        return {key.split("/")[0]: obj["data"]["root-cert.pem"]
                for key, obj in api._objects[CONFIGMAPS].items()}

    async def main() -> None:
        api = FakeApiServer()
        await api.start()
        for name in ("demo", "trellis-system", "kube-system"):
            await api.apply(NAMESPACES, namespace(name, ambient=False))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trellis.cli", "ca", "serve", "--source=kubernetes",
            f"--state-dir={tmp_path / 'state'}", f"--listen=127.0.0.1:{free_port()}",
            f"--metrics=127.0.0.1:{metrics_port}", f"--kubeconfig={kubeconfig}",
            f"--root-configmap={NAME}", stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(START_WAIT_S):
                while len(published(api)) < 3:
                    assert process.returncode is None, "the CA exited"
                    await asyncio.sleep(0.05)
            assert published(api) == dict.fromkeys(
                ("demo", "trellis-system", "kube-system"), ca.root_pem.decode())
            await api.apply(NAMESPACES, namespace("late", ambient=False))
            async with asyncio.timeout(START_WAIT_S):
                while "late" not in published(api):
                    await asyncio.sleep(0.05)
            text = await scrape(metrics_port)
            assert 'trellis_ca_root_configmap_writes_total{result="created"} 4.0' in text
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 10)
            await api.stop()

    asyncio.run(main())
