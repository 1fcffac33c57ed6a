"""The Helm chart: lint, render, schema-validate, and the plain manifests kept current.

helm comes from ``make setup`` (see HELM in the Makefile) and kubernetes-validate
from the test extras; a missing tool fails these tests rather than skipping them.
Rendered objects are validated against the Kubernetes 1.35 schemas shipped inside
kubernetes-validate (offline), in strict mode (unknown fields are errors).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.inprocess

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "charts" / "trellis"
K8S_VERSION = "1.35.0"
VALIDATE = Path(sys.executable).with_name("kubernetes-validate")


def _helm() -> str:
    if os.environ.get("TRELLIS_HELM"):
        return os.environ["TRELLIS_HELM"]
    found = re.search(r"^HELM := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer defines HELM"
    path = ROOT / found.group(1)
    if not path.is_file():
        pytest.fail(f"{path} is missing: run 'make setup'")
    return str(path)


def _template(*flags: str) -> str:
    done = subprocess.run([_helm(), "template", "trellis", str(CHART), "--namespace",
                           "trellis-system", "--include-crds", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _validate(rendered: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered)
    done = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", K8S_VERSION, str(path)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _docs(rendered: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(rendered) if d}


def test_lint_strict() -> None:
    done = subprocess.run([_helm(), "lint", "--strict", str(CHART)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _pod(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = docs["DaemonSet", "trellis-agent"]["spec"]["template"]
    return pod


def _containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["spec"]["containers"]}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container["volumeMounts"]}


def _parsed(container: dict[str, Any]) -> argparse.Namespace:
    """The container's args as the real `trellis` CLI parses them: a flag the CLI
    does not know, or a bad choice, fails here rather than in a crash-looping pod."""
    from trellis.cli import build_parser

    args = [a.replace("$(NODE_NAME)", "node-1") for a in container["args"]]
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"trellis refuses the {container['name']} container's args: {args}")


def test_default_render_validates(tmp_path: Path) -> None:
    rendered = _template()
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    pod = _pod(docs)
    assert [c["name"] for c in pod["spec"]["containers"]] == ["proxy", "agent", "install-cni"]
    proxy, agent = _containers(pod)["proxy"], _containers(pod)["agent"]
    for container in (proxy, agent):
        security = container["securityContext"]
        assert security["privileged"] is False
        assert security["readOnlyRootFilesystem"] is True
        # NET_RAW is needed by neither: NET_ADMIN also allows IP_TRANSPARENT. The agent
        # alone opens pods' /proc/<pid>/ns/net, a ptrace access check: SYS_PTRACE.
        add = ["NET_ADMIN", "SYS_ADMIN", *(["SYS_PTRACE"] if container is agent else [])]
        assert security["capabilities"] == {"drop": ["ALL"], "add": add}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15015}
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {
        "http-metrics": 15020, "http-ready": 15021}
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {
        "agent-metrics": 15014, "agent-ready": 15015}
    # Prometheus scrapes the proxy, on ztunnel's port, as Istio's dashboards expect.
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30
    assert proxy["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert agent["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert docs["Service", "trellis-ca"]["spec"]["ports"][0]["port"] == 15012
    assert ("CustomResourceDefinition", "authorizationpolicies.security.trellis.dev") in docs
    # Without PEMs in the values the root Secret is made out of band, not by the chart.
    assert not any(kind == "Secret" for kind, _ in docs)


def test_the_proxy_and_the_agent_run_their_own_commands() -> None:
    containers = _containers(_pod(_docs(_template())))
    proxy, agent = _parsed(containers["proxy"]), _parsed(containers["agent"])
    assert (proxy.command, proxy.proxy_command) == ("proxy", "run")
    assert (agent.command, agent.agent_command) == ("agent", "run")
    assert proxy.node == agent.node == "node-1"
    assert proxy.source == agent.source == "kubernetes"
    assert proxy.control_socket == agent.control_socket == Path("/var/run/trellis/proxy.sock")
    assert proxy.ca_url == "https://trellis-ca.trellis-system.svc:15012"
    assert proxy.ca_root == Path("/etc/trellis/ca-root/root-cert.pem")
    assert proxy.token_file == Path("/var/run/secrets/trellis/token")
    assert (proxy.metrics, proxy.readiness) == ("0.0.0.0:15020", "0.0.0.0:15021")
    assert proxy.drain_seconds == 25  # the proxy drains, and still fits in the grace
    assert proxy.trust_domain == agent.trust_domain == "cluster.local"
    # The agent holds no certificate and drains nothing in this mode.
    assert not any(a.startswith(("--ca-", "--token-file", "--drain-seconds"))
                   for a in containers["agent"]["args"])
    assert (agent.metrics, agent.readiness) == ("0.0.0.0:15014", "0.0.0.0:15015")
    assert agent.redirect == "iptables"
    assert agent.cni_socket == Path("/host/cni/socket/cni.sock")


def test_the_control_socket_is_shared_through_a_pod_volume() -> None:
    pod = _pod(_docs(_template()))
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # An emptyDir lives as long as the pod: a restarted agent finds the proxy's socket.
    assert "emptyDir" in volumes["control"]
    for name in ("proxy", "agent"):
        assert _mounts(_containers(pod)[name])["control"]["mountPath"] == "/var/run/trellis"


def test_each_container_mounts_only_what_it_uses() -> None:
    pod = _pod(_docs(_template()))
    containers = _containers(pod)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    proxy, agent = _mounts(containers["proxy"]), _mounts(containers["agent"])
    # The proxy gets namespaces as fds from the agent: no host path at all.
    assert not any("hostPath" in volumes[name] for name in proxy)
    # Only the proxy asks the CA for certificates.
    assert {"ca-root", "ca-token"} <= proxy.keys()
    assert not {"ca-root", "ca-token"} & agent.keys()
    # The plugin on the host dials the host path; the agent serves it through its mount.
    install = containers["install-cni"]
    assert "--agent-socket=/var/run/trellis/cni.sock" in install["args"]
    assert volumes["cni-socket"]["hostPath"]["path"] == "/var/run/trellis"
    assert agent["cni-socket"]["mountPath"] == "/host/cni/socket"
    # Only the installer writes the host's CNI directories.
    assert {"cni-bin", "cni-conf"} <= _mounts(install).keys()
    assert not {"cni-bin", "cni-conf"} & (agent.keys() | proxy.keys())
    # eBPF's host paths only in eBPF mode.
    assert not {"bpffs", "cgroup"} & (agent.keys() | volumes.keys())


def test_the_cni_installer_keeps_watching_and_knows_its_daemonset() -> None:
    docs = _docs(_template("--set", "cni.excludeNamespaces={kube-system,monitoring}"))
    pod = _pod(docs)
    assert "initContainers" not in pod["spec"]  # it runs as long as the node pod
    install = _containers(pod)["install-cni"]
    args = _parsed(install)
    assert (args.command, args.cni_command) == ("cni", "install")
    assert not args.once and not args.remove
    # The agent's own namespace first: its pod never waits for an agent.
    assert args.exclude_namespace == ["trellis-system", "kube-system", "monitoring"]
    assert args.owner_daemonset == "trellis-system/trellis-agent"
    assert args.ready_file == Path("/tmp/ready")
    assert install["readinessProbe"]["exec"]["command"] == ["test", "-e", "/tmp/ready"]
    assert args.fallback_file == Path("/host/cni/socket/cni.sock.fallback")
    assert install["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    agent_env = {e["name"]: e.get("value") for e in _containers(pod)["agent"]["env"]}
    assert agent_env["TRELLIS_OWNER_DAEMONSET"] == "trellis-system/trellis-agent"
    role = docs["Role", "trellis-agent"]["rules"]
    assert role == [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                     "resourceNames": ["trellis-agent"], "verbs": ["get"]}]
    binding = docs["RoleBinding", "trellis-agent"]
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]


def test_rbac_reads_only_and_the_ca_alone_reviews_tokens() -> None:
    docs = _docs(_template())
    agent = docs["ClusterRole", "trellis-agent"]["rules"]
    assert {v for rule in agent for v in rule["verbs"]} == {"get", "list", "watch"}
    groups = {g for rule in agent for g in rule["apiGroups"]}
    assert {"security.istio.io", "security.trellis.dev", "discovery.k8s.io"} <= groups
    ca = docs["ClusterRole", "trellis-ca"]["rules"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
            "verbs": ["create"]} in ca
    assert not any("secrets" in rule["resources"] for rule in agent + ca)


def test_non_default_values_render_and_validate(tmp_path: Path) -> None:
    rendered = _template(
        "--set", "trustDomain=example.org", "--set", "redirectMode=ebpf",
        "--set", "agent.resources.requests.cpu=250m",
        "--set", "agent.resources.limits.memory=1Gi",
        "--set", "proxy.resources.requests.cpu=500m",
        "--set", "proxy.metricsPort=9090", "--set", "proxy.readinessPort=9091",
        "--set", "agent.metricsPort=9092", "--set", "agent.readinessPort=9093",
        "--set", "agent.terminationGracePeriodSeconds=60",
        "--set", "agent.extraCapabilities={SYS_PTRACE}", "--set", "ca.certLifetime=2h",
        "--set", "cni.enabled=false", "--set-string", "ca.root.cert=CERT",
        "--set-string", "ca.root.key=KEY")
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    pod = _pod(docs)
    containers = _containers(pod)
    proxy, agent = _parsed(containers["proxy"]), _parsed(containers["agent"])
    assert proxy.trust_domain == agent.trust_domain == "example.org"
    assert agent.redirect == "ebpf"
    assert agent.cni_socket is None
    assert "install-cni" not in containers and "initContainers" not in pod["spec"]
    # Without the plugin an uninstall still takes the pods' rules away.
    assert {"name": "TRELLIS_OWNER_DAEMONSET", "value": "trellis-system/trellis-agent"} in (
        containers["agent"]["env"])
    assert ("Role", "trellis-agent") in docs
    assert (proxy.metrics, proxy.readiness) == ("0.0.0.0:9090", "0.0.0.0:9091")
    assert (agent.metrics, agent.readiness) == ("0.0.0.0:9092", "0.0.0.0:9093")
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    assert containers["proxy"]["readinessProbe"]["httpGet"]["port"] == 9091
    assert containers["agent"]["readinessProbe"]["httpGet"]["port"] == 9093
    assert proxy.drain_seconds == 55
    assert containers["agent"]["resources"]["requests"]["cpu"] == "250m"
    assert containers["agent"]["resources"]["limits"]["memory"] == "1Gi"
    assert containers["proxy"]["resources"]["requests"]["cpu"] == "500m"
    # Extra capabilities are the agent's; the proxy keeps its two.
    assert containers["agent"]["securityContext"]["capabilities"]["add"] == [
        "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    assert containers["proxy"]["securityContext"]["capabilities"]["add"] == [
        "NET_ADMIN", "SYS_ADMIN"]
    # eBPF pins live in the host's bpffs, so they outlive the agent container, and
    # programs attach to cgroups of the whole host tree.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert volumes["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    mounts = _mounts(containers["agent"])
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    assert mounts["cgroup"] == {"name": "cgroup", "mountPath": "/sys/fs/cgroup",
                                "readOnly": True}
    assert not {"bpffs", "cgroup"} & _mounts(containers["proxy"]).keys()
    assert pod["spec"]["hostPID"] is True
    assert ("Secret", "trellis-ca-root") in docs
    # Not the chart's: the CA publishes it to every namespace (nodeagent/ca_rootcm.py).
    assert ("ConfigMap", "trellis-ca-root-cert") not in docs


def _refused(*values: str) -> str:
    done = subprocess.run([_helm(), "template", "trellis", str(CHART), *values],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0, "helm rendered values it should refuse"
    return done.stderr


def test_ebpf_without_host_pid_is_refused() -> None:
    # The agent must see the proxy's pid (SO_PEERCRED) and the pods' in /proc.
    stderr = _refused("--set", "redirectMode=ebpf", "--set", "agent.hostPID=false")
    assert "redirectMode=ebpf needs agent.hostPID=true" in stderr


def test_iptables_without_host_pid_renders() -> None:
    pod = _pod(_docs(_template("--set", "agent.hostPID=false")))
    assert pod["spec"]["hostPID"] is False


def test_the_two_containers_cannot_share_a_port() -> None:
    # The old agent.metricsPort default, kept in someone's values file, is now the proxy's.
    stderr = _refused("--set", "agent.metricsPort=15020")
    assert "agent.metricsPort and proxy.metricsPort are both 15020" in stderr


@pytest.mark.parametrize("values", [
    ["--set", "redirectMode=nftables"],
    ["--set", "ca.certLifetime=1d"],
    ["--set", "agent.notASetting=1"],
    ["--set", "proxy.notASetting=1"],
    ["--set", "proxy.metricsPort=0"],
    ["--set", "proxy.resources.notAField=1"],
])
def test_bad_values_are_refused_by_the_schema(values: list[str]) -> None:
    assert "values don't meet the specifications of the schema" in _refused(*values)


def test_plain_manifests_are_up_to_date() -> None:
    done = subprocess.run([str(ROOT / "deploy" / "render-manifests.sh"), _helm()],
                          capture_output=True, text=True, timeout=120, check=True)
    committed = (ROOT / "deploy" / "manifests" / "trellis.yaml").read_text()
    assert done.stdout == committed, "deploy/manifests/ is stale: run 'make manifests'"
