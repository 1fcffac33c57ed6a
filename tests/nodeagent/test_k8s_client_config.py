"""Which client configuration the Kubernetes source uses: kubeconfig, in-cluster, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kubernetes_asyncio.config import incluster_config

from nodeagent.k8s_client import load_configuration

pytestmark = pytest.mark.unit


def test_in_cluster_config_when_running_in_a_pod(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("projected-token\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    configuration = asyncio.run(load_configuration(None))
    assert configuration.host == "https://10.96.0.1:443"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert "projected-token" in str(configuration.api_key)


def test_kubeconfig_wins_over_in_cluster(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
""")
    assert asyncio.run(load_configuration(kubeconfig)).host == "https://127.0.0.1:6443"


def test_unusable_kubeconfig_is_one_error_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(ValueError, match=r"^--kubeconfig: cannot load .*kubeconfig"):
        asyncio.run(load_configuration(tmp_path / "kubeconfig"))
