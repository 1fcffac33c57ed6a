"""The CA's objects in the chart: its PodDisruptionBudget and a readiness probe that
the CA answers only when it serves (issue 17, "CA")."""

from __future__ import annotations

import asyncio
import ssl
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodeagent"))
from chart_support import container, pod_spec, template

from identity.ca import CertificateAuthority
from identity.ca_server import CaServerConfig, serve_ca
from identity.ca_store import CaStateError
from identity.node_auth import StaticTokenAuthenticator

pytestmark = pytest.mark.inprocess


def _pdb(*flags: str) -> dict[str, Any]:
    spec: dict[str, Any] = template(*flags)["PodDisruptionBudget", "trellis-ca"]["spec"]
    return spec


def test_one_replica_never_blocks_a_drain() -> None:
    spec = _pdb()
    assert spec == {"maxUnavailable": 1, "selector": spec["selector"]}
    deployment = template()["Deployment", "trellis-ca"]["spec"]
    assert spec["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]


def test_several_replicas_keep_one_signing() -> None:
    spec = _pdb("--set", "ca.replicas=3")
    assert spec["minAvailable"] == 1 and "maxUnavailable" not in spec


def _probe(docs: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, str, int]:
    ca = container(pod_spec(docs, "Deployment", "trellis-ca"), "ca")
    get = ca["readinessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in ca["ports"]}
    port = get["port"] if isinstance(get["port"], int) else ports[get["port"]]
    return get["scheme"], get["path"], port


async def _kubelet_probe(port: int, scheme: str, path: str) -> int | None:
    """An httpGet probe as the kubelet sends it: HTTPS without verifying the
    certificate; the status, or None when nothing answers."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context if scheme == "HTTPS" else None)
    except OSError:
        return None
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                 .encode())
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1]) if status_line else None


def test_the_probe_passes_only_against_a_ca_serving_from_its_root(tmp_path: Path) -> None:
    scheme, path, chart_port = _probe(template("--set", "ca.port=15999"))
    assert (scheme, path, chart_port) == ("HTTPS", "/healthz", 15999)
    good = tmp_path / "good"
    ca = CertificateAuthority.load_or_create(good, "cluster.local")
    # A root whose key is another's: the CA refuses to start, so it never turns ready.
    bad = tmp_path / "bad"
    CertificateAuthority.load_or_create(bad, "cluster.local")
    (bad / "root-key.pem").write_bytes((good / "root-key.pem").read_bytes())
    with pytest.raises(CaStateError, match=r"root-key\.pem"):
        CertificateAuthority.load_or_create(bad, "cluster.local")

    async def main() -> None:
        config = CaServerConfig(host="127.0.0.1", port=0, lifetime=timedelta(hours=1))
        server = await serve_ca(config, ca, _NoWorkloads(), StaticTokenAuthenticator({}))
        port = server.port
        async with server:
            assert await _kubelet_probe(port, scheme, path) == 200
        # Positive control for "not ready": the same probe once nothing serves.
        assert await _kubelet_probe(port, scheme, path) is None

    asyncio.run(main())


class _NoWorkloads:
    def runs_on(self, node: str, identity: object) -> bool:
        return False


def test_a_plugin_secret_mounts_cacerts_and_signs_with_the_intermediate() -> None:
    default = container(pod_spec(template(), "Deployment", "trellis-ca"), "ca")
    assert "--plugin-ca" not in default["args"]
    spec = pod_spec(template("--set", "ca.pluginSecretName=cacerts"), "Deployment",
                    "trellis-ca")
    ca = container(spec, "ca")
    assert "--plugin-ca" in ca["args"]
    mount = next(m for m in ca["volumeMounts"] if m["name"] == "root")
    assert f"--state-dir={mount['mountPath']}" in ca["args"]
    volume = next(v for v in spec["volumes"] if v["name"] == "root")
    assert volume["secret"]["secretName"] == "cacerts"


def test_istio_coexistence_and_root_namespace_reach_both_node_processes() -> None:
    docs = template()
    proxy = container(pod_spec(docs, "DaemonSet", "trellis-proxy"), "proxy")
    agent = container(pod_spec(docs, "DaemonSet", "trellis-agent"), "agent")
    assert "--istio-coexistence" in proxy["args"] and "--istio-coexistence" in agent["args"]
    assert "--istio-root-namespace=istio-system" in proxy["args"]
    off = template("--set", "istioCoexistence=false", "--set", "istioRootNamespace=mesh")
    proxy = container(pod_spec(off, "DaemonSet", "trellis-proxy"), "proxy")
    agent = container(pod_spec(off, "DaemonSet", "trellis-agent"), "agent")
    assert "--no-istio-coexistence" in proxy["args"] and "--no-istio-coexistence" in agent["args"]
    assert "--istio-root-namespace=mesh" in proxy["args"]


def test_the_ca_may_publish_its_bundle_and_the_proxies_see_it_change() -> None:
    docs = template()
    rules = docs["ClusterRole", "trellis-ca"]["rules"]
    assert {"apiGroups": [""], "resources": ["configmaps"],
            "verbs": ["get", "list", "watch", "create", "update"]} in rules
    assert {"apiGroups": [""], "resources": ["namespaces"],
            "verbs": ["get", "list", "watch"]} in rules
    ca = container(pod_spec(docs, "Deployment", "trellis-ca"), "ca")
    assert "--root-configmap=trellis-ca-root-cert" in ca["args"]
    # The proxies mount that ConfigMap as a directory: the kubelet updates such a
    # volume in place, never one mounted with subPath, so a rotation reaches them.
    spec = pod_spec(docs, "DaemonSet", "trellis-proxy")
    volume = next(v for v in spec["volumes"] if v.get("configMap"))
    assert volume["configMap"]["name"] == "trellis-ca-root-cert"
    proxy = container(spec, "proxy")
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount
    assert f"--ca-root={mount['mountPath']}/root-cert.pem" in proxy["args"]
