"""The Helm chart as a cluster would run it: render it with ``helm template``, then
start a container's own command line with exactly the uid, groups and
capabilities its ``securityContext`` grants (``setpriv``, from util-linux)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "charts" / "trellis"
RELEASE, NAMESPACE = "trellis", "trellis-system"
TRELLIS = [sys.executable, "-m", "trellis.cli"]  # the image's ENTRYPOINT, from this tree


def helm() -> str:
    if os.environ.get("TRELLIS_HELM"):
        return os.environ["TRELLIS_HELM"]
    found = re.search(r"^HELM := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile no longer defines HELM"
    path = ROOT / found.group(1)
    if not path.is_file():
        pytest.fail(f"{path} is missing: run 'make setup'")
    return str(path)


def template(*flags: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered chart, by (kind, name)."""
    done = subprocess.run([helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "--include-crds", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(done.stdout) if d}


def pod_spec(docs: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = docs[kind, name]["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in spec["containers"] if c["name"] == name)
    return found


def capabilities(container_spec: dict[str, Any]) -> list[str]:
    """What the runtime grants: nothing kept from the default set (the chart drops
    ALL), plus what ``add`` names, as lower-case setpriv names."""
    caps = container_spec["securityContext"]["capabilities"]
    assert caps.get("drop") == ["ALL"], "expected the chart to drop every default capability"
    return [c.lower() for c in caps.get("add", [])]


def setpriv(spec: dict[str, Any], container_spec: dict[str, Any],
            caps: list[str] | None = None) -> list[str]:
    """A ``setpriv`` prefix that gives a command what the container runtime gives the
    container: its uid and gid, the pod's fsGroup as a supplementary group, the
    bounding set of its capabilities (root then holds exactly those after exec;
    any other uid holds none), no inheritable or ambient capabilities, and
    ``no_new_privs`` for ``allowPrivilegeEscalation: false``. Not reproduced: the
    seccomp profile, the read-only root and the mount namespace."""
    pod_context = spec.get("securityContext", {})
    context = container_spec.get("securityContext", {})
    uid = context.get("runAsUser", pod_context.get("runAsUser", 0))
    gid = context.get("runAsGroup", pod_context.get("runAsGroup", 0))
    groups = [str(g) for g in [pod_context.get("fsGroup")] if g is not None]
    granted = capabilities(container_spec) if caps is None else caps
    bounding = ",".join(["-all", *(f"+{c}" for c in granted)])
    command = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
               f"--groups={','.join(groups)}" if groups else "--clear-groups",
               "--inh-caps=-all", "--ambient-caps=-all", f"--bounding-set={bounding}"]
    if context.get("allowPrivilegeEscalation") is False:
        command.append("--no-new-privs")
    return [*command, "--"]
