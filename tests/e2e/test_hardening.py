"""Issue 10, acceptance 1, as a new user would try it: connections aimed at the
proxy's own ports, from outside the mesh and from inside a pod, are refused at
once and counted; the proxy holds no more fds than before, and the mesh answers.

Before the fix each of these started a relay chain through the proxy's own
listeners that ran the proxy out of fds within a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.labctl import curl_json, eventually, node_metrics, trellis

pytestmark = pytest.mark.e2e

# "A handful": the proxy's fds may move by a few (a pooled connection, a log file
# reopened); a loop holds hundreds within half a second.
FD_SLACK = 5
# curl: 52 empty reply (closed), 56 connection reset; 7 when on loopback the reset
# beats curl's own check of its connect. A relay would answer, or hang (28). That
# the proxy itself refused (and no listener was missing) is the counter's to show.
REFUSED_EXITS = {7, 52, 56}


def _proxy_fds(node: str) -> int:
    pid = int((Path(os.environ["TRELLIS_LAB_DIR"]) / "pids" / f"proxy-{node}.pid").read_text())
    return len(os.listdir(f"/proc/{pid}/fd"))


REFUSED = "trellis_connections_refused_total"
# Plain TCP to 15008 is no loop (15008 is the HBONE listener itself, never
# redirected): it fails the TLS handshake, which is counted there.
HANDSHAKE_FAILED = "trellis_hbone_handshake_failures_total"


def _ip(lab: dict, name: str) -> str:
    return str(next(p["ip"] for p in lab["pods"] if p["name"] == name))


def _counted(lab: dict, node: str, name: str, labels: dict[str, str]) -> float:
    netns = next(n["netns"] for n in lab["nodes"] if n["name"] == node)
    total = 0.0
    for family in text_string_to_metric_families(node_metrics(netns)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _curl_exit(src_pod: str, url: str) -> int:
    return trellis("lab", "exec", src_pod, "--", "curl", "-sS", "--max-time", "5", url,
                   check=False).returncode


def _mesh_answers(lab: dict) -> None:
    answer = curl_json("frontend-1", f"http://{_ip(lab, 'backend-2')}:8080/")
    assert answer["pod"] == "backend-2"


@pytest.mark.parametrize(("src_pod", "target", "node", "metric", "labels"), [
    ("legacy-1", "backend-2:15006", "node-2", REFUSED,
     {"direction": "inbound", "reason": "own_port"}),
    ("legacy-1", "backend-2:15001", "node-2", REFUSED,
     {"direction": "inbound", "reason": "own_port"}),
    ("legacy-1", "backend-2:15008", "node-2", HANDSHAKE_FAILED, {}),
    ("frontend-1", "127.0.0.1:15001", "node-1", REFUSED,
     {"direction": "outbound", "reason": "loopback"}),
])
def test_connections_to_the_proxys_own_ports_are_refused(
        lab: dict, src_pod: str, target: str, node: str, metric: str,
        labels: dict[str, str]) -> None:
    host, port = target.split(":")
    ip = _ip(lab, host) if host != "127.0.0.1" else host
    _mesh_answers(lab)  # warm: pooled connections are open before the baseline
    fds = _proxy_fds(node)
    before = _counted(lab, node, metric, labels)
    assert _curl_exit(src_pod, f"http://{ip}:{port}/") in REFUSED_EXITS
    eventually(lambda: _counted(lab, node, metric, labels) == before + 1, timeout=5)
    eventually(lambda: _proxy_fds(node) <= fds + FD_SLACK, timeout=5)
    _mesh_answers(lab)
