"""A kubelet and container runtime for the harness: pods made as a runtime makes them
(a pause process at uid 65535 in a new network namespace, the CNI chain from the
node's config with libcni's semantics, then the containers with their volumes,
environment and privileges), and deleted in the reverse order."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import network as labnet
from tests.cluster.chart import PodFacts, environment, expand, privileges
from tests.cluster.nodes import LAUNCH, PREFIX, Node, launch

CNI_CONF_DIR, CNI_BIN_DIR, CNI_SOCKET_DIR = "/etc/cni/net.d", "/opt/cni/bin", "/var/run/trellis"
SHARED_HOST_PATHS = ("/var/run/netns", "/run/netns")  # the runtime's netns mounts: the machine's
SANDBOX_RETRY_S = 30.0  # how long the "kubelet" keeps retrying a failed sandbox (CNI ADD)
STOP_WAIT_S = 40.0  # the chart's grace period (30 s) and then some


class CniError(RuntimeError):
    pass


@dataclass
class Image:
    """The one image: this machine's root filesystem and the project's venv; its
    entry point ``trellis``; files the Dockerfile puts at fixed paths."""
    entrypoint: list[str]
    files: dict[str, str]  # image path → file on this machine
    env: dict[str, str]
    readable: list[str]


@dataclass
class Pod:
    facts: PodFacts
    node: Node
    netns: str
    sandbox: str
    cgroup: Path
    dir: Path
    spec: dict[str, Any]
    labels: dict[str, str]
    pause: subprocess.Popen[bytes] | None = None
    containers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    cni: tuple[dict[str, Any], dict[str, Any]] | None = None  # conflist, ADD result

    def log(self, container: str) -> Path:
        return self.dir / f"{container}.log"


class Runtime:
    def __init__(self, workdir: Path, image: Image, hosts: dict[str, str],
                 secrets: dict[str, dict[str, bytes]],
                 config_maps: Callable[[str, str], dict[str, str] | None],
                 tokens: Callable[[Pod, str], str], sa_dir: Path, api_env: dict[str, str]) -> None:
        self.workdir, self.image, self.hosts = workdir, image, hosts
        self.secrets, self.config_maps, self.tokens = secrets, config_maps, tokens
        self.sa_dir, self.api_env = sa_dir, api_env
        self.cni_calls: list[str] = []

    # -- CNI, as libcni runs a conflist ----------------------------------------------
    def conflist(self, node: Node) -> dict[str, Any]:
        """The lexically first config of the node's conf dir, as the runtime picks it."""
        conf_dir = node.host_path(CNI_CONF_DIR)
        names = sorted(p.name for p in conf_dir.iterdir()
                       if p.suffix in (".conf", ".conflist", ".json"))
        if not names:
            raise CniError(f"{node.name}: no network config in {CNI_CONF_DIR}")
        data: dict[str, Any] = json.loads((conf_dir / names[0]).read_text())
        if "plugins" not in data:  # a single-plugin .conf
            data = {"cniVersion": data.get("cniVersion"), "name": data.get("name"),
                    "plugins": [{k: v for k, v in data.items() if k not in ("name",)}]}
        return data

    def _invoke(self, pod: Pod, command: str, plugin: dict[str, Any], conflist: dict[str, Any],
                prev: dict[str, Any] | None) -> dict[str, Any] | None:
        config = {"cniVersion": conflist.get("cniVersion"), "name": conflist.get("name"),
                  **plugin}
        if prev is not None:
            config["prevResult"] = prev
        binary = pod.node.host_path(CNI_BIN_DIR) / plugin["type"]
        if not binary.exists():
            raise CniError(f"{command} {plugin['type']}: no such plugin in {CNI_BIN_DIR}")
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.facts.namespace};"
                f"K8S_POD_NAME={pod.facts.name};K8S_POD_INFRA_CONTAINER_ID={pod.sandbox};"
                f"K8S_POD_UID={pod.facts.uid};IP={pod.facts.ip}")
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": pod.sandbox,
               "CNI_NETNS": f"/var/run/netns/{pod.netns}", "CNI_IFNAME": "eth0",
               "CNI_ARGS": args, "CNI_PATH": CNI_BIN_DIR, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        spec = {"netns": f"/run/netns/{pod.node.netns}", "pidns": pod.node.pidns,
                "stage": str(self._stage(f"cni-{pod.sandbox[:8]}")),
                "readable": self.image.readable, "mounts": self._node_mounts(pod.node),
                "env": env, "argv": [f"{CNI_BIN_DIR}/{plugin['type']}"]}
        path = self.workdir / "logs" / f"cni-{pod.sandbox[:8]}.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, str(LAUNCH), str(path)], input=json.dumps(config),
                              capture_output=True, text=True, timeout=60, check=False)
        self.cni_calls.append(f"{command} {plugin['type']} {pod.facts.namespace}/"
                              f"{pod.facts.name}: exit {done.returncode}")
        if done.returncode != 0:
            raise CniError(f"{command} {plugin['type']} for {pod.facts.namespace}/"
                           f"{pod.facts.name}: exit {done.returncode}: {done.stdout.strip()} "
                           f"{done.stderr.strip()}")
        if command != "ADD":
            return None
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def cni_add(self, pod: Pod) -> None:
        conflist = self.conflist(pod.node)
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            prev = self._invoke(pod, "ADD", plugin, conflist, prev)
        assert prev is not None
        pod.cni = (conflist, prev)

    def cni_del(self, pod: Pod) -> None:
        """DEL with the config ADD used (libcni caches it), plugins in reverse order;
        every plugin is called even if one fails, the first failure raised."""
        conflist, result = pod.cni if pod.cni else (self.conflist(pod.node), None)
        failures = []
        for plugin in reversed(conflist["plugins"]):
            try:
                self._invoke(pod, "DEL", plugin, conflist, result)
            except CniError as exc:
                failures.append(str(exc))
        if failures:
            raise CniError("; ".join(failures))

    def cni_check(self, pod: Pod) -> None:
        assert pod.cni is not None, "CHECK needs a pod that ADD set up"
        conflist, result = pod.cni
        for plugin in conflist["plugins"]:
            self._invoke(pod, "CHECK", plugin, conflist, result)

    # -- pods -----------------------------------------------------------------------
    def new_pod(self, node: Node, name: str, namespace: str, spec: dict[str, Any],
                labels: dict[str, str]) -> Pod:
        uid = str(uuid.uuid4())
        short = uid.replace("-", "")[:10]
        pod = Pod(facts=PodFacts(name=name, namespace=namespace, uid=uid, node=node.name,
                                 ip=node.next_ip(),
                                 service_account=spec.get("serviceAccountName", "default")),
                  node=node, netns=f"{PREFIX}p-{short}", sandbox=uuid.uuid4().hex,
                  cgroup=node.cgroup / "kubepods" / "besteffort" / f"pod{uid}",
                  dir=self.workdir / "pods" / f"{namespace}_{name}_{short}", spec=spec,
                  labels=labels)
        pod.dir.mkdir(parents=True)
        return pod

    def start_sandbox(self, pod: Pod) -> None:
        """The pause process and the pod's network: CNI ADD, retried as the kubelet
        retries a failed sandbox (DEL first), until ``SANDBOX_RETRY_S``."""
        labnet.ensure_namespace(pod.netns)
        (pod.cgroup / "pause").mkdir(parents=True)
        pause_spec = {"cgroup": str(pod.cgroup / "pause"), "netns": f"/run/netns/{pod.netns}",
                      "pidns": pod.node.pidns, "newPidns": True,
                      "stage": str(self._stage(f"pause-{pod.sandbox[:8]}")),
                      "readable": [], "readOnlyRoot": True, "env": {"PATH": "/usr/bin:/bin"},
                      "argv": ["setpriv", "--reuid=65535", "--regid=65535", "--clear-groups",
                               "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                               "--", "sleep", "infinity"]}
        pod.pause = launch(pause_spec, pod.dir, "pause")
        deadline = time.monotonic() + SANDBOX_RETRY_S
        while True:
            try:
                self.cni_add(pod)
                return
            except CniError as exc:
                last = exc
            try:
                self.cni_del(pod)
            except CniError:
                pass
            if time.monotonic() > deadline:
                raise CniError(f"sandbox of {pod.facts.namespace}/{pod.facts.name} not "
                               f"created in {SANDBOX_RETRY_S:.0f} s: {last}")
            time.sleep(0.5)  # the kubelet's retry interval, shortened

    def start_container(self, pod: Pod, container: dict[str, Any]) -> subprocess.Popen[bytes]:
        name = container["name"]
        priv = privileges(pod.spec, container)
        extra = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "HOSTNAME": pod.facts.name, "HOME": _home(priv.uid), **self.api_env,
                 **self.image.env}
        env = environment(container, pod.facts, extra)
        command = container.get("command") or self.image.entrypoint
        argv = [*command, *(expand(a, env) for a in container.get("args", []))]
        host_pid = bool(pod.spec.get("hostPID"))
        cgroup = pod.cgroup / name
        cgroup.mkdir(exist_ok=True)
        spec = {"cgroup": str(cgroup), "netns": f"/run/netns/{pod.netns}",
                "pidns": pod.node.pidns, "newPidns": not host_pid,
                "stage": str(self._stage(f"{pod.sandbox[:8]}-{name}")),
                "readable": self.image.readable, "mounts": self._mounts(pod, container),
                "hosts": self._hosts(pod), "readOnlyRoot": priv.read_only_root,
                "env": env, "argv": [*priv.setpriv(), *argv]}
        log = pod.log(name).open("ab")
        process = launch(spec, pod.dir, name, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        pod.containers[name] = process
        return process

    def stop_container(self, pod: Pod, name: str, timeout: float = STOP_WAIT_S) -> int:
        process = pod.containers.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(10)

    def stop_pod(self, pod: Pod, *, cni_del: bool = True) -> None:
        """The kubelet's order: containers get SIGTERM, then the sandbox's network is
        torn down (CNI DEL), then the pause process and the namespace go."""
        for name in list(pod.containers):
            self.stop_container(pod, name)
        try:
            if cni_del and pod.cni is not None:
                self.cni_del(pod)
        finally:
            if pod.pause is not None:
                pod.pause.kill()
                pod.pause.wait(10)
            labnet.delete_namespace(pod.netns)
            pod.node.used_ips.discard(pod.facts.ip)

    # -- volumes ----------------------------------------------------------------------
    def _stage(self, name: str) -> Path:
        path = self.workdir / "stage" / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def _node_mounts(self, node: Node) -> list[dict[str, Any]]:
        mounts = [{"source": "/run/netns", "target": "/run/netns"}]
        for path in (CNI_CONF_DIR, CNI_BIN_DIR, CNI_SOCKET_DIR):
            node.host_path(path).mkdir(parents=True, exist_ok=True)
            mounts.append({"source": str(node.host_path(path)), "target": path})
        return mounts

    def _hosts(self, pod: Pod) -> str:
        lines = ["127.0.0.1\tlocalhost", f"{pod.facts.ip}\t{pod.facts.name}"]
        lines += [f"{ip}\t{name}" for name, ip in self.hosts.items()]
        return "\n".join(lines) + "\n"

    def _mounts(self, pod: Pod, container: dict[str, Any]) -> list[dict[str, Any]]:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        mounts = [{"source": source, "target": target, "readOnly": True}
                  for target, source in self.image.files.items()]
        if pod.spec.get("automountServiceAccountToken", True):
            mounts.append({"source": str(self.sa_dir),
                           "target": "/var/run/secrets/kubernetes.io/serviceaccount",
                           "readOnly": True})
        for mount in container.get("volumeMounts", []):
            source = self._volume(pod, volumes[mount["name"]])
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(exist_ok=True)
            mounts.append({"source": str(source), "target": mount["mountPath"],
                           "readOnly": bool(mount.get("readOnly"))})
        return mounts

    def _volume(self, pod: Pod, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        where = pod.dir / "volumes" / name
        if "hostPath" in volume:
            path = volume["hostPath"]["path"]
            if path in SHARED_HOST_PATHS:
                return Path("/run/netns")
            host = pod.node.host_path(path)
            kind = volume["hostPath"].get("type", "")
            if kind == "Directory" and not host.is_dir():
                raise RuntimeError(f"hostPath type check failed: {path} is not a directory")
            host.mkdir(parents=True, exist_ok=True)
            return host
        if where.exists():
            return where
        where.mkdir(parents=True)
        if "emptyDir" in volume:
            return where
        if "configMap" in volume:
            data = _wait_config_map(self.config_maps, pod.facts.namespace,
                                    volume["configMap"]["name"])
            return _key_volume(where, data, mode=volume["configMap"].get("defaultMode", 0o644),
                               gid=None)
        if "secret" in volume:
            data = self.secrets[volume["secret"]["secretName"]]
            group = (pod.spec.get("securityContext") or {}).get("fsGroup")
            mode = volume["secret"].get("defaultMode", 0o644)
            return _key_volume(where, data, mode=mode | (0o040 if group is not None else 0),
                               gid=group)
        if "projected" in volume:
            files = {}
            for source in volume["projected"]["sources"]:
                token = source["serviceAccountToken"]
                files[token["path"]] = self.tokens(pod, token.get("audience", "")).encode()
            return _key_volume(where, files, mode=0o600, gid=None)
        raise RuntimeError(f"volume {name}: kind not supported by the harness: {volume}")


def _wait_config_map(get: Callable[[str, str], dict[str, str] | None], namespace: str,
                     name: str) -> dict[str, bytes]:
    """The kubelet holds a pod in ContainerCreating until its ConfigMap exists."""
    deadline = time.monotonic() + SANDBOX_RETRY_S
    while (data := get(namespace, name)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f'configmap "{name}" not found in {namespace}')
        time.sleep(0.2)
    return {k: v.encode() for k, v in data.items()}


def _home(uid: int) -> str:
    """HOME as runc sets it: the user's entry in the image's /etc/passwd, else /."""
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/"


def _key_volume(where: Path, files: dict[str, bytes], *, mode: int, gid: int | None) -> Path:
    """An atomic-writer volume as the kubelet lays it out: a timestamped directory
    reached through ``..data``, one symlink per key."""
    data = where / "..2026_12_08_00_00_00.000000001"
    data.mkdir()
    (where / "..data").symlink_to(data.name)
    for key, content in files.items():
        (data / key).write_bytes(content)
        os.chown(data / key, 0, gid if gid is not None else 0)
        (data / key).chmod(mode)
        (where / key).symlink_to(Path("..data") / key)
    where.chmod(0o755)
    return where
