"""The CA with ``ca.pluginSecretName`` as the chart runs it: the Deployment's own
arguments from ``helm template``, its uid and (no) capabilities, in a network
namespace, the cacerts Secret laid out as the kubelet mounts it. A proxy that trusts
the offline root alone gets a certificate whose chain carries the intermediate, from
a CA whose own serving chain verifies to that root too; and the CA publishes that
root, not the intermediate, to every namespace."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from chart_support import ROOT, container, pod_spec, template
from fake_apiserver import CONFIGMAPS
from k8s_support import write_kubeconfig
from test_k8s_ca_chart import (
    api_server_in,
    arg,
    readable_by,
    request_in,
    secret_volume,
    serving,
    start_ca,
)

from identity.certs import generate_key, load_pem_chain, private_key_pem
from identity.spiffe import Identity

pytestmark = pytest.mark.netns

sys.path.insert(0, str(ROOT / "tests" / "identity"))
from test_ca_intermediate import make_plugin  # noqa: E402


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="trellis-ca-plugin-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_the_chart_ca_signs_with_the_plugin_intermediate(netns: str, shared_dir: Path) -> None:
    docs = template("--set", "ca.pluginSecretName=cacerts")
    spec = pod_spec(docs, "Deployment", "trellis-ca")
    ca_container = container(spec, "ca")
    proxy = container(pod_spec(docs, "DaemonSet", "trellis-proxy"), "proxy")
    dialled = urlsplit(arg(proxy["args"], "--ca-url"))
    root, inter = make_plugin(shared_dir / "made")
    uid = ca_container.get("securityContext", {}).get("runAsUser",
                                                      spec["securityContext"]["runAsUser"])
    if not readable_by(uid, ROOT / "trellis" / "cli.py", Path(sys.executable)):
        uid = 0  # a private checkout: as in test_k8s_ca_chart, root without capabilities
        ca_container = {**ca_container, "securityContext": {
            **ca_container.get("securityContext", {}), "runAsUser": 0, "runAsGroup": 0}}
    secret = secret_volume(shared_dir / "secret", {
        name: (shared_dir / "made" / name).read_bytes()
        for name in ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")},
        mode=0o400, uid=uid, gid=uid)
    root_pem = (shared_dir / "made" / "root-cert.pem").read_bytes()

    async def main() -> None:
        api = await api_server_in(netns)
        kubeconfig = write_kubeconfig(shared_dir / "kubeconfig", api)
        kubeconfig.chmod(0o644)
        process = await start_ca(netns, spec, ca_container, secret, kubeconfig)
        try:
            await serving(process)
            url = f"https://127.0.0.1:{dialled.port}"
            bundle = await request_in(netns, url, dialled.hostname or "", root_pem)
            assert bundle.identity == Identity.of("demo", "web")
            assert load_pem_chain(bundle.chain_pem)[1:] == [inter]
            assert load_pem_chain(bundle.root_pem) == [root]
            async with asyncio.timeout(30):
                while "demo/trellis-ca-root-cert" not in api._objects[CONFIGMAPS]:
                    await asyncio.sleep(0.05)
            published = api._objects[CONFIGMAPS]["demo/trellis-ca-root-cert"]
            assert load_pem_chain(published["data"]["root-cert.pem"].encode()) == [root]
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 10)
            await api.stop()

    asyncio.run(main())


def test_a_plugin_secret_whose_key_does_not_fit_stops_the_chart_ca(
        netns: str, shared_dir: Path) -> None:
    docs = template("--set", "ca.pluginSecretName=cacerts")
    spec = pod_spec(docs, "Deployment", "trellis-ca")
    ca_container = container(spec, "ca")
    ca_container = {**ca_container, "securityContext": {
        **ca_container.get("securityContext", {}), "runAsUser": 0, "runAsGroup": 0}}
    make_plugin(shared_dir / "made")
    files = {name: (shared_dir / "made" / name).read_bytes()
             for name in ("ca-cert.pem", "cert-chain.pem", "root-cert.pem")}
    files["ca-key.pem"] = private_key_pem(generate_key())
    secret = secret_volume(shared_dir / "secret", files, mode=0o400, uid=0, gid=0)

    async def main() -> bytes:
        api = await api_server_in(netns)
        kubeconfig = write_kubeconfig(shared_dir / "kubeconfig", api)
        process = await start_ca(netns, spec, ca_container, secret, kubeconfig)
        try:
            assert process.stderr is not None
            err = await asyncio.wait_for(process.stderr.read(), 30)
            assert await asyncio.wait_for(process.wait(), 10) == 2
            return err
        finally:
            if process.returncode is None:
                process.terminate()
                await process.wait()
            await api.stop()

    err = asyncio.run(main()).decode()
    assert f"{secret / 'ca-key.pem'} is not the private key of {secret / 'ca-cert.pem'}" in err
