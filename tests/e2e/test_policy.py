"""Authorization in the lab: Istio AuthorizationPolicy objects, applied live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from lab.state import write_atomic
from tests.e2e.labctl import (
    curl_json,
    eventually,
    in_netns,
    node_netns,
    pod,
    read_until,
    trellis,
    wait_until_listening,
)

pytestmark = pytest.mark.e2e

ALLOW_FRONTEND = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/frontend"]}
"""
STRICT_MTLS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: strict-mtls, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source: {notPrincipals: ["*"]}
"""
DENY_FRONTEND = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/demo/sa/frontend"]}
"""
# Bad on purpose: a CIDR that is not one. `lab apply` refuses the whole file.
MALFORMED = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: demo}
spec:
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: ["10.0.0.300/8"]}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def applied(lab: dict, tmp_path: Path) -> Iterator[list[Path]]:
    """Policies a test applies; all deleted afterwards, whatever happened."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        trellis("lab", "delete", "-f", str(path), check=False)


def _apply(applied: list[Path], tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path, name, text)
    trellis("lab", "apply", "-f", str(path))
    applied.append(path)


# curl's exit codes when the proxy refuses: 52 empty reply, 56 reset, 7 refused.
REFUSED = {7, 52, 56}


def _reaches(src: str, dst_ip: str) -> bool:
    """True if the request is answered, False if it is refused; a timeout is an error.

    Telling "refused" from "slow" keeps a loaded machine from passing a deny test.
    """
    result = trellis("lab", "exec", src, "--", "curl", "-sS", "--max-time", "15",
                     f"http://{dst_ip}:8080/", check=False)
    if result.returncode == 0 and '"pod"' in result.stdout:
        return True
    assert result.returncode in REFUSED, f"neither answered nor refused: {result.stderr}"
    return False


def _proxy_log(node: str) -> str:
    return (Path(os.environ["TRELLIS_LAB_DIR"]) / "logs" / f"proxy-{node}.log").read_text()


def _denied_syns_during(dst: dict, denied: Callable[[], None], allowed_src: str) -> int:
    """Count TCP SYNs to the app port on the pod's loopback from ``denied()``.

    The proxy reaches the app over the pod's ``lo``; a denied connection must
    never get that far. The positive control runs in the same capture: a request
    from ``allowed_src`` must show as a SYN, identified by the source port the
    app reports, or the count means nothing. It also ends the capture: tcpdump
    prints in order, so once the control is printed, the denied attempts are too.
    """
    capture = subprocess.Popen(
        ["ip", "netns", "exec", dst["netns"], "tcpdump", "-i", "lo", "-n", "-l", "-U",
         "tcp dst port 8080 and tcp[tcpflags] & tcp-syn != 0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_listening(capture)
        denied()
        peer_ip, peer_port = curl_json(allowed_src, f"http://{dst['ip']}:8080/")["peer"].split(":")
        control = f"IP {peer_ip}.{peer_port} > ".encode()
        out = read_until(capture, control)
    finally:
        capture.terminate()
        capture.communicate(timeout=10)
    syns = [line for line in out.decode().splitlines() if "IP " in line]
    return sum(1 for line in syns if f"IP {peer_ip}.{peer_port} > " not in line)


@pytest.mark.lab_modes("iptables", "ebpf")
def test_allow_policy_admits_only_its_principal(lab: dict, tmp_path: Path,
                                                applied: list[Path]) -> None:
    backend2 = pod("backend-2")
    _apply(applied, tmp_path, "allow.yaml", ALLOW_FRONTEND)
    eventually(lambda: not _reaches("backend-1", backend2["ip"]), timeout=5)
    assert _reaches("frontend-1", backend2["ip"])
    def denied() -> None:
        assert not _reaches("backend-1", backend2["ip"])

    syns = _denied_syns_during(backend2, denied, allowed_src="frontend-1")
    assert syns == 0, "a denied connection reached the app"
    denials = [json.loads(line) for line in _proxy_log("node-2").splitlines()
               if '"denied: no_allow_match"' in line]
    assert denials and denials[-1]["policy"] == "demo/allow-frontend"
    assert denials[-1]["src_identity"] == "spiffe://cluster.local/ns/demo/sa/backend"
    # Deleting the policy restores access.
    trellis("lab", "delete", "-f", str(applied.pop()))
    eventually(lambda: _reaches("backend-1", backend2["ip"]), timeout=5)


@pytest.mark.lab_modes("iptables", "ebpf")
def test_strict_mtls_stops_plaintext_only(lab: dict, tmp_path: Path,
                                          applied: list[Path]) -> None:
    backend2 = pod("backend-2")
    assert _reaches("legacy-1", backend2["ip"])
    _apply(applied, tmp_path, "strict.yaml", STRICT_MTLS)
    eventually(lambda: not _reaches("legacy-1", backend2["ip"]), timeout=5)
    assert _reaches("frontend-1", backend2["ip"])
    trellis("lab", "delete", "-f", str(applied.pop()))
    eventually(lambda: _reaches("legacy-1", backend2["ip"]), timeout=5)


HOLD_OPEN = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 8080), timeout=30)
s.sendall(b"GET /held HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
s.recv(65536)
print("open", flush=True)
s.settimeout(30)
try:
    data = s.recv(65536)
except OSError as exc:
    data = b""
print("closed", time.monotonic(), flush=True)
"""


@pytest.mark.lab_modes("iptables", "ebpf")
def test_new_deny_closes_live_connection(lab: dict, tmp_path: Path,
                                         applied: list[Path]) -> None:
    backend2 = pod("backend-2")
    holder = subprocess.Popen(
        [sys.executable, "-m", "trellis", "lab", "exec", "frontend-1", "--",
         sys.executable, "-c", HOLD_OPEN, backend2["ip"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        applied_at = time.monotonic()
        _apply(applied, tmp_path, "deny.yaml", DENY_FRONTEND)
        closed_line = holder.stdout.readline().split()
        assert closed_line and closed_line[0] == "closed", holder.stderr

        took = float(closed_line[1]) - applied_at
        assert took < 2.5, f"live connection closed {took:.2f}s after the policy was applied"
        print(f"live connection closed {took:.2f}s after lab apply returned")
    finally:
        holder.kill()
        holder.communicate(timeout=10)
    log = _proxy_log("node-2")
    assert any("closing live connection" in line and "demo/deny-frontend" in line
               for line in log.splitlines())


def test_policy_check_agrees_with_the_lab(lab: dict, tmp_path: Path,
                                          applied: list[Path]) -> None:
    backend2, backend1 = pod("backend-2"), pod("backend-1")
    path = _write(tmp_path, "allow.yaml", ALLOW_FRONTEND)
    _apply(applied, tmp_path, "allow.yaml", ALLOW_FRONTEND)
    eventually(lambda: not _reaches("backend-1", backend2["ip"]), timeout=5)
    for principal, src_ip, lab_says in (
            ("spiffe://cluster.local/ns/demo/sa/frontend", pod("frontend-1")["ip"], "ALLOW"),
            ("spiffe://cluster.local/ns/demo/sa/backend", backend1["ip"], "DENY")):
        out = trellis("policy", "check", "-f", str(path), "--source-principal", principal,
                      "--source-ip", src_ip, "--dest-namespace", "demo",
                      "--dest-labels", "app=backend", "--dest-ip", backend2["ip"],
                      "--dest-port", "8080", "--json").stdout
        assert json.loads(out)["decision"] == lab_says


def test_lab_apply_refuses_an_invalid_policy_and_changes_nothing(
        lab: dict, tmp_path: Path, applied: list[Path]) -> None:
    """As admission does on a cluster: the loader's error, a failure status, no change."""
    backend2 = pod("backend-2")
    record = _workloads().with_name("lab.json")
    before = _workloads().read_text(), record.read_text()
    path = _write(tmp_path, "mixed.yaml", MALFORMED + "---\n" + STRICT_MTLS)
    result = trellis("lab", "apply", "-f", str(path), check=False)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert ("demo/broken: rules[0].from[0].source.ipBlocks[0]: '10.0.0.300/8' is not a CIDR"
            in result.stderr) and "nothing was applied" in result.stderr
    assert (_workloads().read_text(), record.read_text()) == before
    assert _reaches("legacy-1", backend2["ip"])  # strict-mtls, in the same file, was not applied


# A malformed edit of deny-frontend: one good principal, then a CIDR that is not one.
DENY_FRONTEND_BROKEN = DENY_FRONTEND.replace(
    '{principals: ["cluster.local/ns/demo/sa/frontend"]}',
    '{principals: ["cluster.local/ns/demo/sa/frontend"], ipBlocks: ["10.0.0.300/8"]}')
# Never valid: an ALLOW for the backends whose only rule has a port that is not one.
ALLOW_BACKEND_BROKEN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-8080, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - to:
    - operation: {ports: ["80a"]}
"""


def _workloads() -> Path:
    return Path(os.environ["TRELLIS_LAB_DIR"]) / "workloads.yaml"


@pytest.fixture
def unchecked_policy(lab: dict) -> Iterator[Callable[[str], None]]:
    """Puts a policy straight into the file the agents read, past `lab apply`'s check,
    as a cluster without the CRD's validation would hand it over; restores the file."""
    original = _workloads().read_text()

    def put(text: str) -> None:
        new = yaml.safe_load(text)
        key = (new["kind"], new["metadata"]["name"])
        docs = [d for d in yaml.safe_load_all(_workloads().read_text())
                if d and (d.get("kind"), d.get("metadata", {}).get("name")) != key]
        write_atomic(_workloads(), yaml.safe_dump_all([*docs, new]))

    yield put
    write_atomic(_workloads(), original)


def _check(policy_file: Path, principal: str, src_ip: str, dst_ip: str,
           ) -> subprocess.CompletedProcess[str]:
    return trellis("policy", "check", "-f", str(policy_file), "--source-principal", principal,
                   "--source-ip", src_ip, "--dest-namespace", "demo", "--dest-labels",
                   "app=backend", "--dest-ip", dst_ip, "--dest-port", "8080", "--json")


def test_a_malformed_edit_leaves_the_old_deny_enforcing(
        lab: dict, tmp_path: Path, applied: list[Path],
        unchecked_policy: Callable[[str], None]) -> None:
    """Acceptance 3: the old DENY still refuses; `policy check` and the log name the field."""
    backend2, frontend1 = pod("backend-2"), pod("frontend-1")
    _apply(applied, tmp_path, "deny.yaml", DENY_FRONTEND)
    eventually(lambda: not _reaches("frontend-1", backend2["ip"]), timeout=5)
    bad_field = "rules[0].from[0].source.ipBlocks[0]"
    broken = _write(tmp_path, "deny-broken.yaml", DENY_FRONTEND_BROKEN)
    refused = trellis("lab", "apply", "-f", str(broken), check=False)
    assert refused.returncode == 2 and bad_field in refused.stderr

    unchecked_policy(DENY_FRONTEND_BROKEN)
    eventually(lambda: "invalid policy: its last valid version stays in force"
               in _proxy_log("node-2"), timeout=5)
    line = json.loads(next(line for line in reversed(_proxy_log("node-2").splitlines())
                           if "its last valid version" in line))
    assert (line["policy"], line["field"]) == ("demo/deny-frontend", bad_field)
    assert not _reaches("frontend-1", backend2["ip"])
    assert _reaches("backend-1", backend2["ip"])  # the old DENY, not a deny-everything
    metrics = in_netns(node_netns("node-2"), "curl", "-sS",
                       "http://127.0.0.1:15020/metrics").stdout
    assert any(line.startswith("trellis_policy_invalid{") and line.endswith(" 1.0")
               and 'policy="demo/deny-frontend"' in line and 'fallback="last_valid"' in line
               for line in metrics.splitlines()), metrics

    checked = _check(broken, "spiffe://cluster.local/ns/demo/sa/frontend", frontend1["ip"],
                     backend2["ip"])
    assert f"demo/deny-frontend: {bad_field}: '10.0.0.300/8' is not a CIDR" in checked.stderr
    decision = json.loads(checked.stdout)
    assert (decision["decision"], decision["reason"]) == ("DENY", "invalid_policy")


def test_a_never_valid_allow_denies_its_workloads(
        lab: dict, unchecked_policy: Callable[[str], None]) -> None:
    backend2, frontend2 = pod("backend-2"), pod("frontend-2")
    assert _reaches("frontend-1", backend2["ip"])  # positive control: no policy yet
    unchecked_policy(ALLOW_BACKEND_BROKEN)
    eventually(lambda: not _reaches("frontend-1", backend2["ip"]), timeout=5)
    assert _reaches("frontend-1", frontend2["ip"])  # not selected: still allowed
    log = _proxy_log("node-2")
    assert ("demo/allow-8080: rules[0].to[0].operation.ports[0]: '80a' is not a port" in log)
    denials = [json.loads(line) for line in log.splitlines()
               if '"denied: invalid_policy"' in line]
    assert denials and denials[-1]["policy"] == "demo/allow-8080"


@pytest.mark.lab_modes("iptables", "ebpf")
def test_denials_show_in_metrics(lab: dict, tmp_path: Path,
                                           applied: list[Path]) -> None:
    backend2 = pod("backend-2")
    _apply(applied, tmp_path, "allow.yaml", ALLOW_FRONTEND)
    eventually(lambda: not _reaches("backend-1", backend2["ip"]), timeout=5)
    metrics = in_netns(node_netns("node-2"), "curl", "-sS", "http://127.0.0.1:15020/metrics").stdout
    assert ('trellis_policy_denials_total{policy="demo/allow-frontend",'
            'reason="no_allow_match"}') in metrics
    assert 'response_flags="DENY"' in metrics
    assert curl_json("frontend-1", f"http://{backend2['ip']}:8080/")["pod"] == "backend-2"
