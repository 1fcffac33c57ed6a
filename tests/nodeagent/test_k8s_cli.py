"""`trellis ca serve --source kubernetes` and `trellis agent run --source kubernetes` as
processes, against the API-server stand-in through a kubeconfig."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from fake_apiserver import FakeApiServer
from k8s_support import NAMESPACES, PODS, namespace, pod, write_kubeconfig

from identity.ca import CertificateAuthority
from identity.ca_client import CertificateRequestFailed, request_certificate
from identity.spiffe import Identity

pytestmark = pytest.mark.inprocess

TRELLIS = [sys.executable, "-m", "trellis.cli"]
AGENT_TOKEN = {"authenticated": True, "audiences": ["trellis-ca"],
               "user": {"username": "system:serviceaccount:trellis-system:trellis-agent",
                        "extra": {"authentication.kubernetes.io/node-name": ["node-1"]}}}
START_WAIT_S = 30.0  # process start-up bound (imports, first list); not a speed claim


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cluster(tmp_path: Path) -> tuple[FakeApiServer, Path]:
    api = FakeApiServer(tokens={"agent-token": AGENT_TOKEN})
    await api.start()
    await api.apply(NAMESPACES, namespace("demo"))
    await api.apply(PODS, pod("web-1", "10.1.0.11", node="node-1", sa="web"))
    return api, write_kubeconfig(tmp_path / "kubeconfig", api)


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    await asyncio.wait_for(process.wait(), 10)


def test_ca_serve_from_kubernetes_with_root_from_a_mounted_secret(tmp_path: Path) -> None:
    # The Secret as the kubelet mounts it: the key files are symlinks into ..data/,
    # with the volume's defaultMode, which the chart must set to 0400 (the CA
    # refuses a root key others can read; Kubernetes' default is 0644).
    secret = tmp_path / "secret"
    (secret / "..data").mkdir(parents=True)
    CertificateAuthority.load_or_create(tmp_path / "made", "cluster.local")
    for name in ("root-cert.pem", "root-key.pem"):
        (secret / "..data" / name).write_bytes((tmp_path / "made" / name).read_bytes())
        (secret / "..data" / name).chmod(0o400)
        (secret / name).symlink_to(Path("..data") / name)
    secret.chmod(0o500)  # read-only like a Secret volume (root could still write; the CA does not)
    ca = CertificateAuthority.load_or_create(secret, "cluster.local")
    port = free_port()

    async def main() -> None:
        api, kubeconfig = await cluster(tmp_path)
        process = await asyncio.create_subprocess_exec(
            *TRELLIS, "ca", "serve", "--source", "kubernetes", "--kubeconfig", str(kubeconfig),
            "--state-dir", str(secret), "--listen", f"127.0.0.1:{port}",
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(START_WAIT_S):
                while b"ca serving" not in await process.stderr.readline():  # type: ignore[union-attr]
                    assert process.returncode is None
            url = f"https://127.0.0.1:{port}"
            bundle = await request_certificate(ca_url=url, ca_root_pem=ca.root_pem,
                                               token="agent-token",
                                               identity=Identity.of("demo", "web"))
            assert bundle.identity == Identity.of("demo", "web")  # chained to the Secret's root
            with pytest.raises(CertificateRequestFailed) as refused:
                await request_certificate(ca_url=url, ca_root_pem=ca.root_pem, token="other",
                                          identity=Identity.of("demo", "web"))
            assert refused.value.status == 401
        finally:
            await stop(process)
            await api.stop()

    asyncio.run(main())


def test_agent_run_from_kubernetes_becomes_ready_after_the_first_list(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("unused: no pod on this node needs a certificate\n")
    # The trust bundle is read at start (a proxy that trusts nothing refuses to run).
    (tmp_path / "root.pem").write_bytes(CertificateAuthority.create().root_pem)
    ready_port, metrics_port = free_port(), free_port()

    async def ready() -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ready_port)
        except OSError:
            return False
        writer.write(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer.startswith(b"HTTP/1.1 200")

    async def main() -> None:
        api, kubeconfig = await cluster(tmp_path)
        process = await asyncio.create_subprocess_exec(
            *TRELLIS, "agent", "run", "--node", "node-9", "--source", "kubernetes",
            "--kubeconfig", str(kubeconfig), "--ca-url", "https://127.0.0.1:1",
            "--ca-root", str(tmp_path / "root.pem"), "--token-file", str(tmp_path / "token"),
            "--metrics", f"127.0.0.1:{metrics_port}", "--readiness", f"127.0.0.1:{ready_port}",
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(START_WAIT_S):
                while not await ready():
                    assert process.returncode is None
                    await asyncio.sleep(0.1)
            assert any(r.startswith("GET /api/v1/pods?watch=1") for r in api.requests)
        finally:
            await stop(process)
            await api.stop()

    asyncio.run(main())


def test_split_agent_watches_only_its_nodes_pods(tmp_path: Path) -> None:
    # As the chart runs it: with --control-socket the agent only enrolls, so it
    # asks the API server for its node's pods and the namespaces, nothing else.
    metrics_port, ready_port = free_port(), free_port()

    async def main() -> None:
        api, kubeconfig = await cluster(tmp_path)
        process = await asyncio.create_subprocess_exec(
            *TRELLIS, "agent", "run", "--node", "node-9", "--source", "kubernetes",
            "--kubeconfig", str(kubeconfig), "--control-socket", str(tmp_path / "no-proxy"),
            "--metrics", f"127.0.0.1:{metrics_port}", "--readiness", f"127.0.0.1:{ready_port}",
            stderr=asyncio.subprocess.DEVNULL)
        try:
            async with asyncio.timeout(START_WAIT_S):
                while len({r.split("?")[0] for r in api.requests if "watch=1" in r}) < 2:
                    assert process.returncode is None
                    await asyncio.sleep(0.1)
            paths = {unquote(r) for r in api.requests}
            assert {p.split("?")[0] for p in paths} == {"GET /api/v1/namespaces",
                                                         "GET /api/v1/pods"}
            pods = [p for p in paths if p.startswith("GET /api/v1/pods")]
            assert all("fieldSelector=spec.nodeName=node-9" in p for p in pods)
        finally:
            await stop(process)
            await api.stop()

    asyncio.run(main())


def test_agent_run_file_source_still_requires_workloads(tmp_path: Path) -> None:
    import subprocess

    for name in ("root.pem", "token"):
        (tmp_path / name).write_text("x\n")
    done = subprocess.run([*TRELLIS, "agent", "run", "--node", "n", "--ca-url", "https://a:1",
                           "--ca-root", str(tmp_path / "root.pem"),
                           "--token-file", str(tmp_path / "token")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("trellis: error: workloads_file: required with source "
                                   "'file' (--workloads)")
