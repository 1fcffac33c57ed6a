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


def _pod(docs: dict[tuple[str, str], dict[str, Any]], component: str = "agent") -> dict[str, Any]:
    pod: dict[str, Any] = docs["DaemonSet", f"trellis-{component}"]["spec"]["template"]
    return pod


def _node_containers(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The containers of both node pods (the agent's and the proxy's), by name."""
    return _containers(_pod(docs, "agent")) | _containers(_pod(docs, "proxy"))


def _all_pods(docs: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"] for (kind, _), d in docs.items()
            if kind in ("DaemonSet", "Deployment")]


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
    pod, proxy_pod = _pod(docs), _pod(docs, "proxy")
    # Two node DaemonSets, as istio-cni and ztunnel: one ServiceAccount each.
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent", "install-cni"]
    assert [c["name"] for c in proxy_pod["spec"]["containers"]] == ["proxy"]
    assert pod["spec"]["serviceAccountName"] == "trellis-agent"
    assert proxy_pod["spec"]["serviceAccountName"] == "trellis-proxy"
    # The agent reads the host's /proc; the proxy gets namespaces as fds.
    assert pod["spec"]["hostPID"] is True and proxy_pod["spec"]["hostPID"] is False
    proxy, agent = _containers(proxy_pod)["proxy"], _containers(pod)["agent"]
    for container in (proxy, agent):
        security = container["securityContext"]
        assert security["privileged"] is False
        assert security["readOnlyRootFilesystem"] is True
        # NET_RAW is needed by neither: NET_ADMIN also allows IP_TRANSPARENT. The agent
        # alone opens pods' /proc/<pid>/ns/net, a ptrace access check: SYS_PTRACE.
        add = ["NET_ADMIN", "SYS_ADMIN", *(["SYS_PTRACE"] if container is agent else [])]
        assert security["capabilities"] == {"drop": ["ALL"], "add": add}
        # SYS_ADMIN can always escalate: the spec says so (kubernetes#119568).
        assert security["allowPrivilegeEscalation"] is True
    assert _containers(pod)["install-cni"]["securityContext"]["allowPrivilegeEscalation"] is False
    for node_pod in (pod, proxy_pod):
        assert node_pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert node_pod["spec"]["priorityClassName"] == "system-node-critical"
        assert node_pod["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15015}
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {
        "http-metrics": 15020, "http-ready": 15021}
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {
        "agent-metrics": 15014, "agent-ready": 15015}
    # Prometheus scrapes the proxy, on ztunnel's port, as Istio's dashboards expect.
    assert proxy_pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert proxy_pod["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "15014"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30
    assert proxy_pod["spec"]["terminationGracePeriodSeconds"] == 30
    # No memory limit on the proxy: its view of the cluster grows with the cluster,
    # and an OOM kill refuses every enrolled pod's connections on the node.
    assert proxy["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    assert agent["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}
    assert docs["Service", "trellis-ca"]["spec"]["ports"][0]["port"] == 15012
    assert ("CustomResourceDefinition", "authorizationpolicies.security.trellis.dev") in docs
    # Without PEMs in the values the root Secret is made out of band, not by the chart.
    assert not any(kind == "Secret" for kind, _ in docs)


def test_the_proxy_and_the_agent_run_their_own_commands() -> None:
    containers = _node_containers(_docs(_template()))
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


def test_the_control_socket_is_shared_through_a_host_directory() -> None:
    docs = _docs(_template())
    # Two pods: only a host directory joins them (an emptyDir is one pod's).
    for component in ("agent", "proxy"):
        pod = _pod(docs, component)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["control"]["hostPath"] == {"path": "/var/run/trellis-proxy",
                                                  "type": "DirectoryOrCreate"}
        container = _containers(pod)[component]
        assert _mounts(container)["control"]["mountPath"] == "/var/run/trellis"
        assert "--control-socket=/var/run/trellis/proxy.sock" in container["args"]


def test_the_control_socket_never_shares_the_cni_socket_directory() -> None:
    stderr = _refused("--set", "proxy.controlSocketDir=/var/run/trellis/")
    assert "proxy.controlSocketDir and cni.socketDir are both /var/run/trellis" in stderr


def test_update_strategies() -> None:
    docs = _docs(_template())
    # The proxy surges, as ztunnel does: the new one takes the pods before the old
    # one stops (deploy/README.md, "Upgrading the proxy";
    # tests/tunnel/test_proxy_surge_netns.py).
    assert docs["DaemonSet", "trellis-proxy"]["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert docs["DaemonSet", "trellis-agent"]["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_each_container_mounts_only_what_it_uses() -> None:
    docs = _docs(_template())
    pod, proxy_pod = _pod(docs), _pod(docs, "proxy")
    containers = _node_containers(docs)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    proxy_volumes = {v["name"]: v for v in proxy_pod["spec"]["volumes"]}
    proxy, agent = _mounts(containers["proxy"]), _mounts(containers["agent"])
    # The proxy gets namespaces as fds from the agent: no host path but the control
    # socket's directory.
    assert [name for name in proxy if "hostPath" in proxy_volumes[name]] == ["control"]
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
    # The proxy's credentials are not even volumes of the agent's pod.
    assert not {"ca-root", "ca-token"} & volumes.keys()


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


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def _bound(docs: dict[tuple[str, str], dict[str, Any]], account: str) -> set[tuple[str, str, str]]:
    """Everything ServiceAccount ``account`` may do, through any binding."""
    granted: set[tuple[str, str, str]] = set()
    for (kind, _), doc in docs.items():
        if kind in ("ClusterRoleBinding", "RoleBinding") and any(
                s["name"] == account for s in doc["subjects"]):
            role_kind = "ClusterRole" if kind == "ClusterRoleBinding" else "Role"
            granted |= _granted(docs[role_kind, doc["roleRef"]["name"]]["rules"])
    return granted


def test_rbac_each_process_reads_only_what_it_watches() -> None:
    docs = _docs(_template())
    reads = {"get", "list", "watch"}
    # nodeagent/source_k8s.py: the proxy's RESOURCES; the split agent's
    # agent_resources; the agent's look at its own DaemonSet on shutdown.
    proxy = {("", r, v) for r in ("pods", "namespaces", "services") for v in reads} | {
        ("discovery.k8s.io", "endpointslices", v) for v in reads} | {
        (g, "authorizationpolicies", v) for g in ("security.istio.io", "security.trellis.dev")
        for v in reads}
    agent = {("", r, v) for r in ("pods", "namespaces") for v in reads} | {
        ("apps", "daemonsets", "get")}
    assert _bound(docs, "trellis-proxy") == proxy
    assert _bound(docs, "trellis-agent") == agent
    ca = docs["ClusterRole", "trellis-ca"]["rules"]
    assert {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
            "verbs": ["create"]} in ca
    assert not any(resource == "secrets" for account in ("trellis-proxy", "trellis-agent",
                                                         "trellis-ca")
                   for _, resource, _ in _bound(docs, account))
    # The CA signs for the proxies, which present their own ServiceAccount's token.
    ca_args = docs["Deployment", "trellis-ca"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--agent-service-account=trellis-system/trellis-proxy" in ca_args


def test_non_default_values_render_and_validate(tmp_path: Path) -> None:
    rendered = _template(
        "--set", "trustDomain=example.org", "--set", "redirectMode=ebpf",
        "--set", "agent.resources.requests.cpu=250m",
        "--set", "agent.resources.limits.memory=1Gi",
        "--set", "proxy.resources.requests.cpu=500m",
        "--set", "proxy.metricsPort=9090", "--set", "proxy.readinessPort=9091",
        "--set", "agent.metricsPort=9092", "--set", "agent.readinessPort=9093",
        "--set", "proxy.terminationGracePeriodSeconds=60",
        "--set", "agent.extraCapabilities={SYS_PTRACE}", "--set", "ca.certLifetime=2h",
        "--set", "cni.enabled=false", "--set-string", "ca.root.cert=CERT",
        "--set-string", "ca.root.key=KEY")
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    pod = _pod(docs)
    containers = _node_containers(docs)
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
    assert _pod(docs, "proxy")["metadata"]["annotations"]["prometheus.io/port"] == "9090"
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
    # bcc is in the agent's image only, and compiles against the node's headers.
    assert containers["agent"]["image"].endswith(":0.1.0-ebpf")
    assert containers["proxy"]["image"].endswith(":0.1.0")
    assert volumes["host-modules"]["hostPath"]["path"] == "/lib/modules"
    assert volumes["host-src"]["hostPath"]["path"] == "/usr/src"
    assert mounts["host-modules"] == {"name": "host-modules", "mountPath": "/lib/modules",
                                      "readOnly": True}
    assert mounts["host-src"]["readOnly"] is True
    assert pod["spec"]["hostPID"] is True
    assert _pod(docs, "proxy")["spec"]["hostPID"] is False  # eBPF too: the agent looks it up
    assert ("Secret", "trellis-ca-root") in docs
    # Not the chart's: the CA publishes it to every namespace (nodeagent/ca_rootcm.py).
    assert ("ConfigMap", "trellis-ca-root-cert") not in docs


SCHEDULING_VALUES = (
    "--set", "agent.nodeSelector.pool=mesh",
    "--set", "agent.nodeSelector.kubernetes\\.io/os=windows",
    "--set", "agent.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
             ".nodeSelectorTerms[0].matchExpressions[0].key=mesh",
    "--set", "agent.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
             ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    "--set", "imagePullSecrets[0].name=regcred",
    "--set", "agent.seLinuxOptions.type=spc_t",
    "--set", "proxy.appArmorProfile.type=Unconfined",
    "--set", "agent.appArmorProfile.type=Localhost",
    "--set", "agent.appArmorProfile.localhostProfile=trellis-agent",
    "--set", "namespace.create=true", "--set", "resourceQuota.enabled=true",
)


def test_scheduling_and_security_values(tmp_path: Path) -> None:
    rendered = _template(*SCHEDULING_VALUES)
    _validate(rendered, tmp_path)
    docs = _docs(rendered)
    agent, proxy = _pod(docs)["spec"], _pod(docs, "proxy")["spec"]
    for spec in (agent, proxy):
        # The user's selector is merged in; Linux stays (no Windows build exists).
        assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "mesh"}
        assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for pod in _all_pods(docs):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["spec"]["nodeSelector"]["kubernetes.io/os"] == "linux"
    assert agent["securityContext"] == {
        "seLinuxOptions": {"type": "spc_t"},
        "appArmorProfile": {"type": "Localhost", "localhostProfile": "trellis-agent"}}
    assert proxy["securityContext"] == {"appArmorProfile": {"type": "Unconfined"}}
    namespace = docs["Namespace", "trellis-system"]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "privileged"
    assert namespace["trellis.dev/dataplane-mode"] == "none"
    quota = docs["ResourceQuota", "trellis-critical-pods"]["spec"]
    assert quota["scopeSelector"]["matchExpressions"] == [
        {"operator": "In", "scopeName": "PriorityClass", "values": ["system-node-critical"]}]
    # Off by default: neither object, and no pod-level context or pull secret.
    default = _docs(_template())
    assert not {"Namespace", "ResourceQuota"} & {kind for kind, _ in default}
    assert "securityContext" not in _pod(default)["spec"]
    assert not any("imagePullSecrets" in pod["spec"] for pod in _all_pods(default))
    # Every pod of the chart runs Linux programs.
    assert all(pod["spec"]["nodeSelector"].get("kubernetes.io/os") == "linux"
               for pod in _all_pods(default))


def _sys_admin_escalation_errors(docs: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Containers whose spec says "no privilege escalation" while holding what always
    allows it. kube-apiserver refuses allowPrivilegeEscalation false with privileged
    or with capabilities.add "CAP_SYS_ADMIN"; it lets the same capability spelled
    "SYS_ADMIN" through only by a bug (kubernetes#119568), so both spellings count."""
    errors = []
    for pod in _all_pods(docs):
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            security = container.get("securityContext", {})
            added = set(security.get("capabilities", {}).get("add", []))
            if security.get("allowPrivilegeEscalation") is False and (
                    security.get("privileged") or {"SYS_ADMIN", "CAP_SYS_ADMIN"} & added):
                errors.append(container["name"])
    return errors


@pytest.mark.parametrize("values", [(), ("--set", "redirectMode=ebpf")])
def test_allow_privilege_escalation_agrees_with_sys_admin(values: tuple[str, ...]) -> None:
    assert _sys_admin_escalation_errors(_docs(_template(*values))) == []


def test_the_escalation_check_sees_a_false_claim() -> None:
    # Positive control for the check above: the chart as it was before.
    docs = _docs(_template())
    agent = _containers(_pod(docs))["agent"]
    agent["securityContext"]["allowPrivilegeEscalation"] = False
    assert _sys_admin_escalation_errors(docs) == ["agent"]


def test_a_quota_needs_a_priority_class() -> None:
    stderr = _refused("--set", "resourceQuota.enabled=true", "--set", "agent.priorityClassName=")
    assert "resourceQuota.enabled needs agent.priorityClassName" in stderr
    # Without a priority class the pods simply carry none.
    docs = _docs(_template("--set", "agent.priorityClassName="))
    assert not any("priorityClassName" in pod["spec"] for pod in _all_pods(docs))


def test_capabilities_with_the_cap_prefix_are_refused() -> None:
    stderr = _refused("--set", "agent.extraCapabilities={CAP_BPF}")
    assert "agent.extraCapabilities: CAP_BPF: name capabilities without the CAP_ prefix" in stderr


def test_ebpf_with_the_headers_in_the_image() -> None:
    docs = _docs(_template("--set", "redirectMode=ebpf", "--set", "ebpf.kernelHeaders=bundled"))
    agent = _containers(_pod(docs))["agent"]
    assert {"name": "BCC_KERNEL_SOURCE", "value": "/opt/trellis/kernel-headers"} in agent["env"]
    assert not {"host-modules", "host-src"} & _mounts(agent).keys()
    # Not in iptables mode, whatever ebpf.* says.
    plain = _containers(_pod(_docs(_template("--set", "ebpf.kernelHeaders=bundled"))))["agent"]
    assert not any(e["name"] == "BCC_KERNEL_SOURCE" for e in plain["env"])
    assert not plain["image"].endswith("-ebpf")


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
    ["--set", "agent.appArmorProfile.type=Disabled"],
    ["--set", "namespace.podSecurityEnforce=lax"],
    ["--set", "imagePullSecrets[0].secret=x"],
])
def test_bad_values_are_refused_by_the_schema(values: list[str]) -> None:
    assert "values don't meet the specifications of the schema" in _refused(*values)


CRD_FILE = CHART / "files" / "crds" / "authorizationpolicies.security.trellis.dev.yaml"


def test_the_crd_is_a_template_so_upgrades_update_it() -> None:
    # Not in crds/ (installed once, never upgraded): plain `helm template` output, which
    # is what `helm upgrade` applies, carries it.
    assert not (CHART / "crds").exists()
    done = subprocess.run([_helm(), "template", "trellis", str(CHART), "--namespace",
                           "trellis-system"], capture_output=True, text=True, timeout=120,
                          check=True)
    docs = _docs(done.stdout)
    crd = docs["CustomResourceDefinition", "authorizationpolicies.security.trellis.dev"]
    assert crd == yaml.safe_load(CRD_FILE.read_text())  # the file, as it is
    # Uninstalling the release must not delete every policy with the CRD.
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    without = _docs(_template("--set", "crds.install=false"))
    assert not any(kind == "CustomResourceDefinition" for kind, _ in without)


def test_plain_manifests_are_up_to_date() -> None:
    done = subprocess.run([str(ROOT / "deploy" / "render-manifests.sh"), _helm()],
                          capture_output=True, text=True, timeout=120, check=True)
    committed = (ROOT / "deploy" / "manifests" / "trellis.yaml").read_text()
    assert done.stdout == committed, "deploy/manifests/ is stale: run 'make manifests'"
