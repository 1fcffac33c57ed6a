"""The foundation, end to end: the default lab with its CA and two node agents.

The lab comes from the session fixture in conftest.py; each test checks one
acceptance point as a user would try it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import nsenter
from tests.e2e.labctl import (
    curl_json,
    eventually,
    in_netns,
    node_metrics,
    node_netns,
    pod,
    read_until,
    status,
    trellis,
    wait_until_listening,
)

pytestmark = pytest.mark.e2e

FRONTEND_PRINCIPAL = "spiffe://cluster.local/ns/demo/sa/frontend"


def _node(lab: dict, name: str) -> dict:
    return next(n for n in lab["nodes"] if n["name"] == name)


def _samples(metrics_text: str, name: str) -> list[dict[str, str]]:
    found = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                found.append({**sample.labels, "_value": sample.value})
    return found


@pytest.mark.lab_modes("iptables", "ebpf")
def test_cross_node_by_pod_ip_keeps_source_ip(lab: dict) -> None:
    backend2, frontend1 = pod("backend-2"), pod("frontend-1")
    answer = curl_json("frontend-1", f"http://{backend2['ip']}:8080/")
    assert answer["pod"] == "backend-2"
    assert answer["peer"].split(":")[0] == frontend1["ip"]


@pytest.mark.lab_modes("iptables", "ebpf")
def test_cross_node_through_service_vip(lab: dict) -> None:
    vip = next(s["vip"] for s in lab["services"] if s["name"] == "backend")
    frontend1 = pod("frontend-1")
    seen = set()
    for _ in range(4):  # round-robin over backend-1 and backend-2
        answer = curl_json("frontend-1", f"http://{vip}:80/")
        assert answer["peer"].split(":")[0] == frontend1["ip"]
        seen.add(answer["pod"])
    assert seen == {"backend-1", "backend-2"}


@pytest.mark.lab_modes("iptables", "ebpf")
def test_uplink_carries_only_tls_to_15008(lab: dict, tmp_path: Path) -> None:
    from scapy.all import IP, TCP, Raw, rdpcap  # scapy is slow to import: only here

    node1 = _node(lab, "node-1")
    marker = f"trellis-marker-{uuid.uuid4().hex}"
    pcap = tmp_path / "uplink.pcap"
    # The TCP under test, and one UDP datagram sent after it to node-2's discard
    # port: the capture ends once tcpdump has printed that one, and as it prints
    # (and writes) in order, every packet of the request is in the file by then.
    node2 = _node(lab, "node-2")
    capture = subprocess.Popen(
        ["ip", "netns", "exec", node1["netns"], "tcpdump", "-i", node1["uplink"], "-U", "-n",
         "-l", "-s", "0", "-w", str(pcap), "--print",
         f"tcp or (udp and dst host {node2['address']} and dst port 9)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_listening(capture)
        backend2 = pod("backend-2")
        answer = curl_json("frontend-1", f"http://{backend2['ip']}:8080/{marker}",
                           "-H", f"X-Marker: {marker}", "--data", marker)
        assert marker in answer["path"]  # the app saw it, so it did cross the uplink
        with nsenter.socket_in(node1["netns"], socket.SOCK_DGRAM) as end:
            end.sendto(b"end of capture", (node2["address"], 9))
        read_until(capture, f" > {node2['address']}.9: UDP".encode())
    finally:
        capture.terminate()
        _, capture_errors = capture.communicate(timeout=10)
    assert pcap.exists(), f"tcpdump wrote nothing: {capture_errors.decode()}"
    packets = [p for p in rdpcap(str(pcap)) if p.haslayer(TCP) and p.haslayer(IP)]
    assert packets, "the capture saw no traffic at all"
    payloads = b"".join(bytes(p[Raw].load) for p in packets if p.haslayer(Raw))
    assert marker.encode() not in payloads
    ports = {(p[TCP].sport, p[TCP].dport) for p in packets}
    pod_traffic = [pp for pp in ports if 15012 not in pp]  # CA renewals may also run
    assert pod_traffic and all(15008 in pp for pp in pod_traffic), pod_traffic
    # TLS application data records (content type 23, TLS 1.2 framing of TLS 1.3)
    assert b"\x17\x03\x03" in payloads


@pytest.mark.lab_modes("iptables", "ebpf")
def test_destination_metrics_show_mutual_tls(lab: dict) -> None:
    backend2 = pod("backend-2")
    curl_json("frontend-1", f"http://{backend2['ip']}:8080/")

    def reported() -> bool:
        samples = _samples(node_metrics(_node(lab, "node-2")["netns"]),
                           "istio_tcp_connections_opened_total")
        return any(s["reporter"] == "destination"
                   and s["source_principal"] == FRONTEND_PRINCIPAL.removeprefix("spiffe://")
                   and s["connection_security_policy"] == "mutual_tls"
                   and s["destination_workload"] == "backend-2" for s in samples)

    eventually(reported, timeout=5)


@pytest.mark.lab_modes("iptables", "ebpf")
def test_unenrolled_pods_use_plain_tcp_both_ways(lab: dict) -> None:
    legacy1, backend2, frontend1 = pod("legacy-1"), pod("backend-2"), pod("frontend-1")
    assert legacy1["enrolled"] is False
    answer = curl_json("legacy-1", f"http://{backend2['ip']}:8080/")
    assert answer["pod"] == "backend-2"
    assert answer["peer"].split(":")[0] == legacy1["ip"]
    answer = curl_json("frontend-1", f"http://{legacy1['ip']}:8080/")
    assert answer["pod"] == "legacy-1"
    assert answer["peer"].split(":")[0] == frontend1["ip"]
    samples = _samples(node_metrics(_node(lab, "node-2")["netns"]),
                       "istio_tcp_connections_opened_total")
    assert any(s["reporter"] == "destination" and s["connection_security_policy"] == "unknown"
               and s["source_workload"] == "legacy-1" for s in samples)


def _served_pods(node_netns: str) -> int:
    samples = _samples(node_metrics(node_netns), "trellis_enrolled_pods")
    return int(samples[0]["_value"])


def _listening_ports(netns: str) -> set[int]:
    out = in_netns(netns, "ss", "-Htln").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def _our_rules(netns: str) -> bool:
    return "TRELLIS" in in_netns(netns, "iptables-save").stdout


def test_adding_a_pod_enrolls_it_and_removing_cleans_up(lab: dict, tmp_path: Path) -> None:
    node2 = _node(lab, "node-2")["netns"]
    served_before = _served_pods(node2)
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: extra-2\n  namespace: demo\n"
        "  labels: {app: extra}\nspec:\n  nodeName: node-2\n  serviceAccountName: extra\n")
    trellis("lab", "apply", "-f", str(manifest))
    extra = pod("extra-2")
    took = eventually(lambda: _our_rules(extra["netns"])
                      and {15001, 15006, 15008} <= _listening_ports(extra["netns"]), timeout=10)
    assert took < 3.0, f"enrollment took {took:.1f}s"
    print(f"enrolled {took:.2f}s after lab apply returned")
    assert _served_pods(node2) == served_before + 1
    answer = curl_json("frontend-1", f"http://{extra['ip']}:8080/")
    assert answer["pod"] == "extra-2"
    trellis("lab", "delete", "-f", str(manifest))
    assert "extra-2" not in {p["name"] for p in status()["pods"]}
    # The proxy dropped the pod: its listeners are closed with it.
    eventually(lambda: _served_pods(node2) == served_before, timeout=5)


def test_unenrolling_by_label_removes_rules_and_listeners(lab: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "pod.yaml"
    body = ("apiVersion: v1\nkind: Pod\nmetadata:\n  name: optout-1\n  namespace: demo\n"
            "  labels: {{app: optout{extra}}}\nspec:\n  nodeName: node-1\n"
            "  serviceAccountName: optout\n")
    manifest.write_text(body.format(extra=""))
    trellis("lab", "apply", "-f", str(manifest))
    ns = pod("optout-1")["netns"]
    eventually(lambda: _our_rules(ns) and 15008 in _listening_ports(ns), timeout=10)
    manifest.write_text(body.format(extra=", trellis.dev/dataplane-mode: none"))
    trellis("lab", "apply", "-f", str(manifest))
    eventually(lambda: not _our_rules(ns)
               and not {15001, 15006, 15008} & _listening_ports(ns), timeout=10)
    assert in_netns(ns, "ip", "rule").stdout.count("lookup 100") == 0
    trellis("lab", "delete", "-f", str(manifest))


def _csr(lab_dir: Path, node: str, identity: str, *, token: str | None = None) -> dict:
    import json
    import sys

    if token is None:
        token = (lab_dir / "tokens" / f"{node}.token").read_text().strip()
    out = in_netns(node_netns(node), sys.executable, "-m", "tests.e2e.csr_probe",
                   "--ca-url", "https://198.18.0.1:15012",
                   "--ca-root", str(lab_dir / "ca" / "root-cert.pem"),
                   "--token", token, "--identity", identity).stdout
    return json.loads(out)


def test_ca_signs_only_identities_that_run_on_the_calling_node(lab: dict) -> None:
    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    signed = _csr(lab_dir, "node-1", "spiffe://cluster.local/ns/demo/sa/backend")
    assert signed == {"signed": True, "identity": "spiffe://cluster.local/ns/demo/sa/backend"}
    # legacy runs only on node-1: node-2 must not be able to mint it.
    refused = _csr(lab_dir, "node-2", "spiffe://cluster.local/ns/demo/sa/legacy")
    assert refused["signed"] is False and refused["status"] == 403
    assert "node-2" in refused["reason"]
    wrong_domain = _csr(lab_dir, "node-1", "spiffe://evil.example/ns/demo/sa/backend")
    assert wrong_domain["signed"] is False and wrong_domain["status"] == 403
    assert "trust domain" in wrong_domain["reason"]
    no_token = _csr(lab_dir, "node-1", "spiffe://cluster.local/ns/demo/sa/backend", token="")
    assert no_token["signed"] is False and no_token["status"] == 401


def _pid(lab_dir: Path, process: str) -> int:
    return int((lab_dir / "pids" / f"{process}.pid").read_text())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.lab_modes("iptables", "ebpf")
def test_new_connections_flow_while_the_agent_is_down_and_after(lab: dict) -> None:
    import signal

    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    agent, proxy = _pid(lab_dir, "agent-node-2"), _pid(lab_dir, "proxy-node-2")
    os.kill(agent, signal.SIGKILL)
    eventually(lambda: _gone(agent), timeout=10)
    # node-2's proxy carries on alone: new connections into node-2 (inbound) and out
    # of it (outbound capture) both work while no agent runs there.
    for _ in range(3):
        inbound = curl_json("frontend-1", f"http://{pod('backend-2')['ip']}:8080/")
        assert inbound["pod"] == "backend-2"
        assert inbound["peer"].split(":")[0] == pod("frontend-1")["ip"]
        outbound = curl_json("backend-2", f"http://{pod('backend-1')['ip']}:8080/")
        assert outbound["pod"] == "backend-1"
        assert outbound["peer"].split(":")[0] == pod("backend-2")["ip"]
    trellis("lab", "up", timeout=120)  # restarts the agent; its replay keeps every pod
    assert _pid(lab_dir, "agent-node-2") != agent
    assert _pid(lab_dir, "proxy-node-2") == proxy  # never restarted
    after = curl_json("frontend-1", f"http://{pod('backend-2')['ip']}:8080/")
    assert after["peer"].split(":")[0] == pod("frontend-1")["ip"]
    assert "agent replay complete" in (lab_dir / "logs" / "proxy-node-2.log").read_text()


def test_port_in_use_is_one_clear_line(lab: dict) -> None:
    import sys

    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    # node-1's proxy already holds 127.0.0.1:15020 in that namespace.
    result = in_netns(
        node_netns("node-1"), sys.executable, "-m", "trellis", "agent", "run", "--node", "node-1",
        "--workloads", str(lab_dir / "workloads.yaml"), "--ca-url", "https://198.18.0.1:15012",
        "--ca-root", str(lab_dir / "ca" / "root-cert.pem"),
        "--token-file", str(lab_dir / "tokens" / "node-1.token"), check=False, timeout=30)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("trellis: error:")]
    assert len(lines) == 1, result.stderr
    assert "--metrics" in lines[0] and "15020" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in result.stderr
