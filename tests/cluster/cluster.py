"""The harness's cluster: the API-server stand-in, nodes, and the chart's workloads run
by the runtime (``runtime.py``) as a kubelet would run them.

``Cluster`` is a context manager: whatever happens, on exit every process (by its
cgroup), namespace, mount (they live in the processes' own mount namespaces) and
file it made is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from identity.ca import CertificateAuthority
from lab import nsenter
from tests.cluster import nodes
from tests.cluster.apiserver import (
    ApiThread,
    ClusterApiServer,
    crd_collections,
    serving_pair,
    tls_context,
)
from tests.cluster.chart import NAMESPACE, Rendered
from tests.cluster.runtime import CNI_BIN_DIR, CNI_CONF_DIR, Image, Pod, Runtime
from tests.nodeagent.fake_apiserver import CONFIGMAPS, KINDS

PODS, NAMESPACES = "/api/v1/pods", "/api/v1/namespaces"
ROOT = Path(__file__).resolve().parents[2]
API_TOKEN = "tclu-service-account-token"
PRIMARY_CONF = "10-tclu.conflist"
WAIT_S = 60.0  # a bound for start-up and convergence on 2 busy cores; never a speed claim


@dataclass
class Code:
    """Which tree's code and chart run: this one, or an old checkout (PYTHONPATH)."""
    root: Path = ROOT
    cni_plugin: Path = ROOT / "build" / "cni" / "trellis-cni"
    python_path: str = ""

    def image(self) -> Image:
        env = {"PYTHONPATH": self.python_path} if self.python_path else {}
        files = ({"/opt/trellis/trellis-cni": str(self.cni_plugin)}
                 if self.cni_plugin.exists() else {})
        return Image(entrypoint=[str(Path(sys.prefix) / "bin" / "trellis")], files=files,
                     env=env, readable=nodes.readable_paths(self.root)
                     + nodes.readable_paths(ROOT))


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S,
             interval: float = 0.2, detail: Callable[[], str] = lambda: "") -> Any:
    """Poll ``check`` until truthy (processes in other namespaces offer no event to
    await); fail naming ``what`` and ``detail()``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except (OSError, ValueError):
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s. {detail()}")
        time.sleep(interval)


@dataclass
class Cluster:
    rendered: Rendered
    code: Code = field(default_factory=Code)
    extra_crds: frozenset[str] = frozenset()
    node_names: tuple[str, ...] = ("node-1", "node-2")
    workdir: Path = field(init=False)
    nodes: dict[str, nodes.Node] = field(default_factory=dict)
    pods: list[Pod] = field(default_factory=list)
    api: ApiThread | None = None
    runtime: Runtime = field(init=False)
    cgroup: Path | None = None

    # -- up and down ----------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self.workdir = Path(tempfile.mkdtemp(prefix="tclu-"))
        self.workdir.chmod(0o755)
        try:
            self._up()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        errors = nodes.remove_everything(self.cgroup)
        if self.api is not None:
            self.api.close()
        if keep := os.environ.get("TCLU_KEEP_LOGS"):  # a post-mortem, on request only
            shutil.copytree(self.workdir / "pods", Path(keep) / self.workdir.name,
                            ignore=shutil.ignore_patterns("volumes"), dirs_exist_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        assert not errors, f"clean-up failed: {errors}"

    def _up(self) -> None:
        stale = nodes.remove_everything(None)
        assert not stale, stale
        (self.workdir / "logs").mkdir()
        self.cgroup = nodes.cgroup_top(uuid.uuid4().hex[:8])
        nodes.make_control()
        certs = self.workdir / "apiserver"
        certs.mkdir()
        ca_crt, crt, key = serving_pair(nodes.API_ADDRESS, certs)
        sock = nsenter.socket_in(nodes.CONTROL_NETNS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((nodes.API_ADDRESS, 443))
        sock.listen(128)
        workloads = self.rendered.of_kind("DaemonSet") + self.rendered.of_kind("Deployment")
        server = ClusterApiServer(crds=crd_collections(self.rendered.docs) | self.extra_crds,
                                  token=API_TOKEN, ssl_context=tls_context(crt, key),
                                  workloads=workloads)
        self.api = ApiThread(server, sock)
        sa_dir = self.workdir / "serviceaccount"
        sa_dir.mkdir()
        (sa_dir / "token").write_text(API_TOKEN)
        (sa_dir / "ca.crt").write_bytes(ca_crt.read_bytes())
        (sa_dir / "namespace").write_text(NAMESPACE)
        root = CertificateAuthority.load_or_create(self.workdir / "ca-root", "cluster.local")
        del root
        root_dir = self.workdir / "ca-root"
        cert = (root_dir / "root-cert.pem").read_bytes()
        key_pem = (root_dir / "root-key.pem").read_bytes()
        # As deploy/README.md's install: the Secret and ConfigMap made out of band.
        secrets = {"trellis-ca-root": {"root-cert.pem": cert, "root-key.pem": key_pem}}
        self.runtime = Runtime(self.workdir, self.code.image(), hosts={}, secrets=secrets,
                               config_maps=self.config_map, tokens=self.issue_token, sa_dir=sa_dir,
                               api_env={"KUBERNETES_SERVICE_HOST": nodes.API_ADDRESS,
                                        "KUBERNETES_SERVICE_PORT": "443"})
        indexes = list(range(1, len(self.node_names) + 1))
        for name, index in zip(self.node_names, indexes, strict=True):
            node = nodes.make_node(name, index, self.workdir, self.cgroup, indexes)
            self.nodes[name] = node
            self._primary_cni(node)
        self.apply(NAMESPACES, {"metadata": {"name": NAMESPACE, "uid": str(uuid.uuid4())}})
        self.apply(CONFIGMAPS, {"metadata": {"name": "trellis-ca-root-cert",
                                             "namespace": NAMESPACE},
                                "data": {"root-cert.pem": cert.decode()}})

    def _primary_cni(self, node: nodes.Node) -> None:
        bin_dir = node.host_path(CNI_BIN_DIR)
        bin_dir.mkdir(parents=True)
        plugin = bin_dir / "tclu-bridge"
        plugin.write_text(f"#!/bin/sh\nexec {sys.executable} "
                          f"{ROOT / 'tests' / 'cluster' / 'primary_cni.py'} \"$@\"\n")
        plugin.chmod(0o755)
        node.host_path(CNI_CONF_DIR).mkdir(parents=True)
        self.write_primary_conf(node)

    def primary_conf(self, node: nodes.Node) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "tclu", "plugins": [
            {"type": "tclu-bridge", "bridge": nodes.POD_BRIDGE,
             "subnet": nodes.node_subnet(node.index), "gateway": node.gateway}]}

    def write_primary_conf(self, node: nodes.Node) -> None:
        """What the cluster's CNI does when it starts (or restarts): writes its own
        config, without anyone's chained entry."""
        path = node.host_path(CNI_CONF_DIR) / PRIMARY_CONF
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.primary_conf(node), indent=1))
        tmp.rename(path)

    # -- the API ----------------------------------------------------------------------
    @property
    def server(self) -> ClusterApiServer:
        assert self.api is not None
        return self.api.server

    def apply(self, collection: str, obj: dict[str, Any]) -> None:
        assert self.api is not None and collection in KINDS
        self.api.call(self.server.apply(collection, obj))

    def pod_object(self, pod: Pod, phase: str) -> dict[str, Any]:
        return {"metadata": {"name": pod.facts.name, "namespace": pod.facts.namespace,
                             "uid": pod.facts.uid, "labels": pod.labels},
                "spec": {**{k: v for k, v in pod.spec.items() if k != "volumes"},
                         "nodeName": pod.node.name,
                         "serviceAccountName": pod.facts.service_account},
                "status": {"phase": phase, "podIP": pod.facts.ip if phase == "Running" else "",
                           **({"podIPs": [{"ip": pod.facts.ip}]} if phase == "Running" else {})}}

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        assert self.api is not None
        return self.api.call(self.server.config_map(namespace, name))

    def issue_token(self, pod: Pod, audience: str) -> str:
        """A projected service-account token bound to ``pod``, known to TokenReview."""
        token = f"tclu-{audience}-{pod.facts.uid}"
        self.server.tokens[token] = {
            "authenticated": True, "audiences": [audience],
            "user": {"username": f"system:serviceaccount:{pod.facts.namespace}:"
                                 f"{pod.facts.service_account}",
                     "extra": {"authentication.kubernetes.io/node-name": [pod.node.name],
                               "authentication.kubernetes.io/pod-name": [pod.facts.name],
                               "authentication.kubernetes.io/pod-uid": [pod.facts.uid]}}}
        return token

    # -- pods -------------------------------------------------------------------------
    def run_pod(self, node: str, name: str, namespace: str, spec: dict[str, Any],
                labels: dict[str, str] | None = None) -> Pod:
        """Scheduler, kubelet and runtime: the pod object, its sandbox (CNI ADD), its
        status with the IP, then its containers."""
        pod = self.runtime.new_pod(self.nodes[node], name, namespace, spec, labels or {})
        self.pods.append(pod)
        self.apply(PODS, self.pod_object(pod, "Pending"))
        self.runtime.start_sandbox(pod)
        for init in spec.get("initContainers", []):
            process = self.runtime.start_container(pod, init)
            code = process.wait(WAIT_S)
            pod.containers.pop(init["name"])
            assert code == 0, f"init container {init['name']} of {name} exited {code}: " \
                              f"{pod.log(init['name']).read_text()[-2000:]}"
        self.apply(PODS, self.pod_object(pod, "Running"))
        for container in spec.get("containers", []):
            self.runtime.start_container(pod, container)
        return pod

    def delete_pod(self, pod: Pod) -> None:
        self.runtime.stop_pod(pod)
        self.pods.remove(pod)
        assert self.api is not None
        self.api.call(self.server.delete(PODS, pod.facts.namespace, pod.facts.name))

    def logs(self, pod: Pod) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}"
                         for p in sorted(pod.dir.glob("*.log")))
