"""Issue 10, acceptance 2, as a new user would try it: an HBONE peer with a valid
certificate floods PING/SETTINGS and never reads, or interleaves bad CONNECTs with
CONNECT+RST. It gets a GOAWAY (ENHANCE_YOUR_CALM), the node proxy's peak RSS
stays within a stated bound, the GOAWAY is counted, and the mesh still answers.

Before the fix the flood grew the proxy's write queue without end (34 MiB after
4 s in the review), and the rapid-reset bypass ran 20,000 rounds with no GOAWAY.
The attacker runs in node-1's namespace (an enrolled pod's own connections to
15008 would be captured by its redirection) with a certificate the lab's CA
signed for node-1's frontend.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from h2.errors import ErrorCodes
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.labctl import curl_json, eventually, in_netns, node_metrics, node_netns, pod

pytestmark = pytest.mark.e2e

# The node proxy's peak RSS may rise by at most this much during an attack that
# sends up to 64 MiB (allocator noise, h2's per-batch events); the write queue
# itself is bounded at 64 KiB (tests/tunnel/test_hbone_guard_io.py).
RSS_BOUND_KIB = 16 * 1024
PEER_ERRORS = "trellis_hbone_peer_errors_total"


def _proxy_pid(lab_dir: Path, node: str) -> int:
    return int((lab_dir / "pids" / f"proxy-{node}.pid").read_text())


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _counted(node: str, reason: str) -> float:
    for family in text_string_to_metric_families(node_metrics(node_netns(node))):
        for sample in family.samples:
            if sample.name == PEER_ERRORS and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


def _mesh_answers() -> None:
    assert curl_json("frontend-1", f"http://{pod('backend-2')['ip']}:8080/")["pod"] == "backend-2"


@pytest.mark.parametrize(("attack", "reason"), [("flood", "control_flood"),
                                                ("rapid-reset", "rapid_reset")])
def test_an_abusive_hbone_peer_gets_goaway_and_the_proxy_stays_bounded(
        lab: dict, attack: str, reason: str) -> None:
    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    _mesh_answers()
    pid = _proxy_pid(lab_dir, "node-2")
    rss_before = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
    counted_before = _counted("node-2", reason)
    out = in_netns(
        node_netns("node-1"), sys.executable, "-m", "tests.e2e.hbone_abuse_probe",
        "--ca-url", "https://198.18.0.1:15012", "--ca-root", str(lab_dir / "ca" / "root-cert.pem"),
        "--token", (lab_dir / "tokens" / "node-1.token").read_text().strip(),
        "--identity", "spiffe://cluster.local/ns/demo/sa/frontend",
        "--target", f"{pod('backend-2')['ip']}:15008", "--attack", attack, timeout=90).stdout
    result = json.loads(out)
    assert result["goaway"] == ErrorCodes.ENHANCE_YOUR_CALM, result
    peak_growth = _status_kib(pid, "VmHWM") - rss_before
    print(f"{attack}: {result}, proxy peak RSS +{peak_growth} KiB")  # for the record (-s)
    assert peak_growth <= RSS_BOUND_KIB, f"peak RSS grew {peak_growth} KiB during {result}"
    eventually(lambda: _counted("node-2", reason) == counted_before + 1, timeout=5)
    _mesh_answers()
