"""`trellis lab demo` (what `make demo` runs): the default lab, then traffic through it.

Each call is shown as the command a user can paste, then what the app answered.
The app reports the peer it saw, so the output itself shows the mesh keeping the
client's address across nodes. The lab stays up afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from lab.lifecycle import MESH, Out, read_description, up
from lab.plan import APP_PORT, LabPlan, PodPlan
from lab.processes import METRICS_PORT
from lab.state import LabDir, load_record

CURL_SECONDS = 5
METRIC = "istio_tcp_connections_opened_total"


@dataclass(frozen=True)
class Call:
    title: str
    client: str  # pod name
    url: str


def calls(plan: LabPlan) -> tuple[Call, ...]:
    backend = _pod(plan, "backend-2")
    vip = next(s.vip for s in plan.services if s.name == "backend")
    return (
        Call("frontend-1 (node-1) -> backend-2 (node-2) by pod IP: mTLS over HBONE",
             "frontend-1", f"http://{backend.ip}:{APP_PORT}/by-pod-ip"),
        Call("frontend-1 -> the backend Service VIP: the proxy picks a backend pod",
             "frontend-1", f"http://{vip}:80/by-vip"),
        Call("legacy-1 (not in the mesh) -> backend-2: plain TCP into the mesh",
             "legacy-1", f"http://{backend.ip}:{APP_PORT}/from-legacy"),
    )


def demo(labdir: LabDir, out: Out) -> int:
    up(labdir, read_description(None), MESH, out)
    record = load_record(labdir)
    assert record is not None  # `up` just wrote it
    plan = record.plan
    ok = all([_show_call(plan, call, out) for call in calls(plan)])
    ok &= _show_metrics(plan, out)
    out("")
    out("Next, try:")
    out("  trellis lab status                  # nodes, pods, addresses, processes")
    out(f"  trellis lab exec frontend-1 -- curl -s {_pod(plan, 'backend-2').ip}:{APP_PORT}/hi")
    out("  trellis lab exec backend-2 -- ss -tn    # connections as the pod sees them")
    out(f"  ip netns exec {_pod(plan, 'backend-2').netns} tcpdump -ni eth0   "
        "# only HBONE (port 15008) on the wire")
    out(f"  ip netns exec {plan.node('node-2').netns} curl -s 127.0.0.1:{METRICS_PORT}/metrics")
    out("  trellis lab down                    # remove everything")
    return 0 if ok else 1


def _show_call(plan: LabPlan, call: Call, out: Out) -> bool:
    client = _pod(plan, call.client)
    out("")
    out(f"# {call.title}")
    out(f"$ trellis lab exec {call.client} -- curl -s {call.url}")
    result = _run(client.netns, ["curl", "-sS", "--max-time", str(CURL_SECONDS), call.url])
    if result.returncode != 0:
        out(f"  failed (curl exit status {result.returncode}): {result.stderr.strip()}")
        return False
    out(result.stdout.strip())
    try:
        peer = str(json.loads(result.stdout)["peer"]).rsplit(":", 1)[0]
    except (ValueError, KeyError):
        out("  failed: the answer is not the demo app's JSON")
        return False
    kept = "kept" if peer == client.ip else "NOT kept"
    out(f"  -> the app saw {peer}: the client's address {client.ip} was {kept}")
    return peer == client.ip


def _show_metrics(plan: LabPlan, out: Out) -> bool:
    node = plan.node("node-2")
    out("")
    out("# node-2's proxy counted those connections")
    out(f"$ ip netns exec {node.netns} curl -s 127.0.0.1:{METRICS_PORT}/metrics | grep {METRIC}")
    result = _run(node.netns, ["curl", "-sS", "--max-time", str(CURL_SECONDS),
                               f"http://127.0.0.1:{METRICS_PORT}/metrics"])
    lines = [line for line in result.stdout.splitlines() if METRIC in line]
    for line in lines:
        out(line)
    if result.returncode != 0 or not lines:
        out(f"  failed: no {METRIC} lines (curl exit status {result.returncode})")
        return False
    return True


def _run(netns: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, timeout=CURL_SECONDS + 5, check=False)


def _pod(plan: LabPlan, name: str) -> PodPlan:
    return plan.find_pods(name)[0]
