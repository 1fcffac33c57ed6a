"""The chart as ``helm template`` renders it, read the way the kubelet reads a pod spec:
each container's command line (the image's entry point, ``$(VAR)`` expanded), its
environment (``fieldRef`` resolved), its volumes and its ``securityContext``."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.nodeagent.chart_support import helm

RELEASE, NAMESPACE = "trellis", "trellis-system"


@dataclass(frozen=True)
class Rendered:
    docs: list[dict[str, Any]]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.docs:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"the chart renders no {kind} {name}")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]


def render(chart: Path, *flags: str) -> Rendered:
    done = subprocess.run([helm(), "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                           "--include-crds", *flags], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"helm template failed: {done.stderr}"
    return Rendered([d for d in yaml.safe_load_all(done.stdout) if d])


@dataclass
class PodFacts:
    """What the downward API and the kubelet know of a pod."""
    name: str
    namespace: str
    uid: str
    node: str
    ip: str
    service_account: str


_FIELDS = {"spec.nodeName": "node", "metadata.name": "name", "metadata.namespace": "namespace",
           "metadata.uid": "uid", "status.podIP": "ip",
           "spec.serviceAccountName": "service_account"}


def environment(container: dict[str, Any], pod: PodFacts, extra: dict[str, str]) -> dict[str, str]:
    env = dict(extra)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
            continue
        ref = var["valueFrom"]["fieldRef"]["fieldPath"]
        assert ref in _FIELDS, f"env {var['name']}: fieldRef {ref} is not resolved here"
        env[var["name"]] = getattr(pod, _FIELDS[ref])
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion (``$$`` escapes; unknown names stay)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Privileges:
    uid: int
    gid: int
    groups: list[int] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    no_new_privs: bool = False
    read_only_root: bool = False

    def setpriv(self) -> list[str]:
        """What the runtime grants, as a ``setpriv`` prefix: uid, gid, supplementary
        groups, exactly these capabilities in the bounding set (root holds them after
        exec, another uid none), nothing inheritable or ambient."""
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in self.capabilities)])
        command = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                   f"--groups={','.join(map(str, self.groups))}" if self.groups
                   else "--clear-groups",
                   "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}"]
        if self.no_new_privs:
            command.append("--no-new-privs")
        return [*command, "--"]


# What a container runtime (containerd, CRI-O) grants when a container drops nothing.
RUNTIME_DEFAULT_CAPS = ["CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW",
                        "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE",
                        "SYS_CHROOT", "KILL", "AUDIT_WRITE"]


def privileges(pod_spec: dict[str, Any], container: dict[str, Any]) -> Privileges:
    pod_context = pod_spec.get("securityContext") or {}
    context = container.get("securityContext") or {}
    uid = context.get("runAsUser", pod_context.get("runAsUser", 0))
    gid = context.get("runAsGroup", pod_context.get("runAsGroup", 0))
    caps_spec = context.get("capabilities") or {}
    drop = {c.upper() for c in caps_spec.get("drop", [])}
    kept = [] if "ALL" in drop else [c for c in RUNTIME_DEFAULT_CAPS if c not in drop]
    added = [c.upper() for c in caps_spec.get("add", [])]
    if context.get("privileged"):
        added = ["ALL"]
    groups = [g for g in [pod_context.get("fsGroup")] if g is not None]
    groups += pod_context.get("supplementalGroups", [])
    return Privileges(uid=uid, gid=gid, groups=groups,
                      capabilities=sorted(set(kept) | set(added)),
                      no_new_privs=context.get("allowPrivilegeEscalation") is False,
                      read_only_root=bool(context.get("readOnlyRootFilesystem")))
