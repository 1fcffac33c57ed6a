"""The mesh end to end in eBPF mode: the same lab, ``trellis lab up --redirect ebpf``.

The lab is tests/e2e/conftest.py's ``lab`` in its ``ebpf`` mode (prefix
``tlab-ebpf-``, its own directory); the foundation and authorization tests marked
``lab_modes("iptables", "ebpf")`` run against it too. Here are the points only
eBPF mode has: no netfilter rules in pods, pins that survive an agent SIGKILL
without duplicates, and a ``lab down`` that leaves no program, link or pin behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.labctl import LAB_DIR, curl_json, eventually, in_netns, pod, status
from tests.e2e.labctl import trellis as _trellis

# The eBPF lab, from conftest.py's ``lab``; the foundation and authorization tests
# that hold in both modes say so in test_mesh.py and test_policy.py.
pytestmark = [pytest.mark.e2e, pytest.mark.lab_modes("ebpf")]

BPF_ROOT = Path("/sys/fs/bpf/trellis/tlab-ebpf")


def _pod_cgroup(name: str) -> str:
    doc = next(d for d in _workloads() if d["kind"] == "Pod" and d["metadata"]["name"] == name)
    return str(doc["metadata"]["annotations"]["trellis.dev/cgroup"])


def _workloads() -> list[dict]:
    import yaml

    text = (Path(os.environ[LAB_DIR]) / "workloads.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def _cgroup_progs(cgroup: str) -> list[tuple[int, str]]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True,
                         text=True, check=True).stdout.strip()
    return sorted((p["id"], p["attach_type"]) for p in json.loads(out or "[]"))


def _pins() -> set[str]:
    if not BPF_ROOT.exists():
        return set()
    return {str(p.relative_to(BPF_ROOT)) for p in BPF_ROOT.rglob("*")}


def test_enrolled_pods_have_no_netfilter_rules(lab: dict) -> None:
    for name in ("frontend-1", "backend-2"):
        ns = pod(name)["netns"]
        assert "-A " not in in_netns(ns, "iptables-save").stdout
        assert in_netns(ns, "nft", "list", "ruleset").stdout.strip() == ""
        assert [t for _i, t in _cgroup_progs(_pod_cgroup(name))] == [
            "cgroup_inet4_connect", "cgroup_sock_ops"]


def test_enrolment_and_unenrolment_pin_and_unpin(lab: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    body = ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: optin-2\n  namespace: demo\n"
            "  labels: {{app: optin{extra}}}\nspec:\n  nodeName: node-2\n"
            "  serviceAccountName: optin\n")
    manifest.write_text(body.format(extra=""))
    _trellis("lab", "apply", "-f", str(manifest))
    pin = "node-2/pods/demo_optin-2/connect4"
    eventually(lambda: pin in _pins(), timeout=15)
    answer = curl_json("frontend-1", f"http://{pod('optin-2')['ip']}:8080/")
    assert answer["pod"] == "optin-2"
    assert answer["peer"].split(":")[0] == pod("frontend-1")["ip"]
    manifest.write_text(body.format(extra=", trellis.dev/dataplane-mode: none"))
    _trellis("lab", "apply", "-f", str(manifest))
    eventually(lambda: not any(p.startswith("node-2/pods/demo_optin-2") for p in _pins()),
               timeout=15)
    ns = pod("optin-2")["netns"]
    assert _cgroup_progs(_pod_cgroup("optin-2")) == []
    assert "lookup 100" not in in_netns(ns, "ip", "rule").stdout
    _trellis("lab", "delete", "-f", str(manifest))


def test_agent_sigkill_and_restart_keeps_redirection_without_duplicates(lab: dict) -> None:
    before = {name: _cgroup_progs(_pod_cgroup(name)) for name in ("frontend-2", "backend-2")}
    pins = _pins()
    pid_file = Path(os.environ[LAB_DIR]) / "pids" / "agent-node-2.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    # node-2's proxy outlives its agent, and so do the pinned programs: new
    # connections out of node-2's pods (connect4 + getsockopt) still work.
    answer = curl_json("backend-2", f"http://{pod('backend-1')['ip']}:8080/")
    assert answer["pod"] == "backend-1"
    assert answer["peer"].split(":")[0] == pod("backend-2")["ip"]
    assert _pins() == pins  # the pins, and so the links, outlive the agent
    _trellis("lab", "up", timeout=120)  # the lab restarts the agent, in eBPF mode
    answer = curl_json("frontend-1", f"http://{pod('backend-2')['ip']}:8080/")
    assert answer["pod"] == "backend-2"
    assert answer["peer"].split(":")[0] == pod("frontend-1")["ip"]
    after = {name: _cgroup_progs(_pod_cgroup(name)) for name in ("frontend-2", "backend-2")}
    assert after == before
    assert _pins() == pins


@pytest.mark.lab_teardown
def test_lab_down_leaves_no_program_link_or_pin(lab: dict) -> None:
    cgroups = [_pod_cgroup(p["name"]) for p in status()["pods"] if p["enrolled"]]
    prog_ids = {i for c in cgroups for i, _t in _cgroup_progs(c)}
    assert prog_ids
    _trellis("lab", "down")
    assert not BPF_ROOT.exists()
    assert not any(os.path.exists(c) for c in cgroups)

    def unloaded() -> bool:  # links are released asynchronously, then their programs
        loaded = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"],
                                           capture_output=True, text=True, check=True).stdout)
        return prog_ids.isdisjoint(p["id"] for p in loaded)

    eventually(unloaded, timeout=10)
