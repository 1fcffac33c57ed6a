"""The mesh end to end in eBPF mode: the same lab, ``trellis lab up --redirect ebpf``.

This module brings up its own lab (prefix ``tlab-ebpf-``, its own directory) and
re-runs the foundation and authorization tests against it: they are imported
below, so pytest collects them here too, where ``lab`` is this module's eBPF
lab. Then the points only eBPF mode has: no netfilter rules in pods, pins that
survive an agent SIGKILL without duplicates, and a ``lab down`` that leaves no
program, link or pin behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.labctl import LAB_DIR, LAB_PREFIX, curl_json, eventually, in_netns, pod, status
from tests.e2e.labctl import trellis as _trellis
from tests.e2e.test_mesh import (  # noqa: F401 - collected here, against the eBPF lab
    test_cross_node_by_pod_ip_keeps_source_ip,
    test_cross_node_through_service_vip,
    test_destination_metrics_show_mutual_tls,
    test_new_connections_flow_while_the_agent_is_down_and_after,
    test_unenrolled_pods_use_plain_tcp_both_ways,
    test_uplink_carries_only_tls_to_15008,
)
from tests.e2e.test_policy import (  # noqa: F401
    applied,
    test_allow_policy_admits_only_its_principal,
    test_denials_show_in_metrics,
    test_new_deny_closes_live_connection,
    test_strict_mtls_stops_plaintext_only,
)

pytestmark = pytest.mark.e2e

PREFIX = "tlab-ebpf-"
BPF_ROOT = Path("/sys/fs/bpf/trellis/tlab-ebpf")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    saved = {k: os.environ.get(k) for k in (LAB_DIR, LAB_PREFIX)}
    os.environ[LAB_DIR] = str(tmp_path_factory.mktemp("ebpf-lab"))
    os.environ[LAB_PREFIX] = PREFIX
    _trellis("lab", "down")
    try:
        _trellis("lab", "up", "--redirect", "ebpf", timeout=240)
        yield status()
    finally:
        _trellis("lab", "down")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def test_zz_lab_down_leaves_no_program_link_or_pin(lab: dict) -> None:
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
