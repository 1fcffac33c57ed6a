"""The lab for real: namespaces, veths, routes and apps (root).

One lab is brought up for the module, with its own state directory and its own
namespace prefix, so it can run beside a user's lab; it is always taken down.
The mesh's processes are stood in for by the demo app (same process handling,
readiness probes and pid files), so these tests do not wait on the CA and agent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import lab.cli
from lab import lifecycle, network, supervisor
from lab.errors import LabFailure
from lab.lifecycle import Mesh
from lab.plan import LabPlan, NodePlan
from lab.processes import Probe, ProcessSpec, agent_name
from lab.state import ENV_DIR, ENV_PREFIX, LabDir, load_record

pytestmark = pytest.mark.netns


def trellis_lab(*argv: str) -> int:
    """`trellis lab …` in-process, with only the lab's commands registered."""
    parser = argparse.ArgumentParser(prog="trellis")
    lab.cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *argv])
    return int(args.func(args))


@pytest.fixture(scope="module")
def labdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDir]:
    root = tmp_path_factory.mktemp("lab") / "state"
    prefix = f"tlab-t{uuid.uuid4().hex[:6]}-"
    saved = {key: os.environ.get(key) for key in (ENV_DIR, ENV_PREFIX)}
    os.environ[ENV_DIR], os.environ[ENV_PREFIX] = str(root), prefix
    try:
        yield LabDir(root)
    finally:
        lifecycle.down(LabDir(root), lambda line: None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert network.lab_namespaces(prefix) == []


@pytest.fixture
def plan(labdir: LabDir) -> LabPlan:
    assert trellis_lab("up", "--no-mesh") == 0
    record = load_record(labdir)
    assert record is not None
    return record.plan


def curl(netns: str, url: str) -> dict[str, object]:
    result = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "3", url],
                            capture_output=True, text=True, timeout=10, check=True)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def pod(plan: LabPlan, name: str) -> tuple[str, str]:
    found = plan.find_pods(name)[0]
    return found.netns, found.ip


def test_a_malformed_description_is_one_line_and_creates_nothing(
        labdir: LabDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "lab.yaml"
    bad.write_text("kind: Namespace\nmetadata: {name: demo}\n---\n"
                   "kind: Pod\nmetadata: {name: x, namespace: demo}\nspec: {}\n")
    assert trellis_lab("up", "-f", str(bad)) == 2
    assert capsys.readouterr().err == f"trellis: error: {bad}: Pod demo/x: spec.nodeName: missing\n"
    assert network.lab_namespaces(os.environ[ENV_PREFIX]) == []
    assert not labdir.root.exists()


def test_up_shows_each_step_and_pods_talk_across_nodes(
        labdir: LabDir, capsys: pytest.CaptureFixture[str]) -> None:
    assert trellis_lab("up", "--no-mesh") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines[:-1]] == [f"[{i}/7" for i in range(1, 8)]
    assert lines[2].startswith("[3/7] node-2: network ready")
    assert lines[-1] == "lab is up: 2 nodes, 5 pods, 2 services, mesh off"

    record = load_record(labdir)
    assert record is not None
    frontend_ns, frontend_ip = pod(record.plan, "frontend-1")
    _, backend_ip = pod(record.plan, "backend-2")
    answer = curl(frontend_ns, f"http://{backend_ip}:8080/cross-node")
    assert answer["pod"] == "backend-2"
    assert answer["path"] == "/cross-node"
    assert str(answer["peer"]).split(":")[0] == frontend_ip


def test_up_again_is_harmless_and_says_so(
        plan: LabPlan, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert trellis_lab("up", "--no-mesh") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "lab is already up and healthy: 2 nodes, 5 pods, 2 services, mesh off")
    other = tmp_path / "other.yaml"
    other.write_text("kind: Pod\nmetadata: {name: solo}\nspec: {nodeName: n1}\n")
    assert trellis_lab("up", "-f", str(other), "--no-mesh") == 2
    assert capsys.readouterr().err.startswith(
        "trellis: error: a different lab is up (from default lab)")


def test_status_json_has_the_promised_shape(
        plan: LabPlan, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert trellis_lab("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"nodes", "pods", "services"}
    assert {tuple(sorted(n)) for n in status["nodes"]} == {
        ("address", "name", "netns", "uplink")}
    assert {tuple(sorted(p)) for p in status["pods"]} == {
        ("enrolled", "ip", "labels", "name", "namespace", "netns", "node", "service_account")}
    assert [s["ports"] for s in status["services"]] == [[{"port": 80, "targetPort": 8080}]] * 2
    assert [p["name"] for p in status["pods"] if not p["enrolled"]] == ["legacy-1"]


def test_exec_runs_in_the_pod_and_passes_the_exit_status_through(
        plan: LabPlan, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    assert trellis_lab("exec", "frontend-1", "--", "ip", "-4", "-o", "addr", "show", "eth0") == 0
    assert f"inet {pod(plan, 'frontend-1')[1]}/24" in capfd.readouterr().out
    assert trellis_lab("exec", "frontend-1", "--", "sh", "-c", "exit 7") == 7


def test_exec_of_an_unknown_pod_names_it_and_the_known_ones(
        plan: LabPlan, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    assert trellis_lab("exec", "nope", "--", "true") == 2
    assert capfd.readouterr().err == (
        "trellis: error: unknown pod 'nope'; the lab's pods: "
        "frontend-1, backend-1, legacy-1, frontend-2, backend-2\n")


def test_apply_adds_a_pod_live_and_delete_removes_it(
        plan: LabPlan, labdir: LabDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "kind: Pod\nmetadata: {name: extra, namespace: demo, labels: {app: backend}}\n"
        "spec: {nodeName: node-2, serviceAccountName: backend}\n---\n"
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: demo}\nspec: {}\n")
    capsys.readouterr()
    assert trellis_lab("apply", "-f", str(extra)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Pod demo/extra: created (198.18.2.12 on node-2)",
        "AuthorizationPolicy demo/deny-all: created"]
    answer = curl(pod(plan, "frontend-1")[0], "http://198.18.2.12:8080/new")
    assert answer["pod"] == "extra"
    workloads = labdir.workloads.read_text()
    assert "podIP: 198.18.2.12" in workloads and "name: deny-all" in workloads
    extra_ns = f"{plan.prefix}extra"
    app_pid = int(labdir.pid("app-extra").read_text())

    assert trellis_lab("delete", "-f", str(extra)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Pod demo/extra: deleted", "AuthorizationPolicy demo/deny-all: deleted"]
    assert extra_ns not in network.lab_namespaces(plan.prefix)
    assert not supervisor.is_alive(app_pid)
    assert "extra" not in labdir.workloads.read_text()


def test_a_taken_port_is_one_line_naming_object_and_field(
        plan: LabPlan, labdir: LabDir, capsys: pytest.CaptureFixture[str]) -> None:
    netns, _ = pod(plan, "legacy-1")
    supervisor.stop(labdir, ["app-legacy-1"])
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import socket, sys, time\n"
         "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
         "s.bind(('0.0.0.0', 8080)); s.listen(); print('bound', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "bound\n"
        capsys.readouterr()
        assert trellis_lab("up", "--no-mesh") == 2
        assert capsys.readouterr().err == (
            f"trellis: error: Pod demo/legacy-1: port 8080 (app): already in use in network "
            f"namespace {netns}, by something the lab did not start; find it with "
            f"`ip netns exec {netns} ss -ltnp`\n")
    finally:
        squatter.kill()
        squatter.wait()
        squatter.stdout.close()  # type: ignore[union-attr]
    assert trellis_lab("up", "--no-mesh") == 0


def stand_in_mesh(agent_host: str = "127.0.0.1") -> Mesh:
    """CA and agents played by the demo app, on their real ports and namespaces."""
    def ca(plan: LabPlan, labdir: LabDir) -> ProcessSpec:
        argv = (sys.executable, "-m", "lab.app", "--name", "ca", "--host", "198.18.0.1",
                "--port", "15012")
        return ProcessSpec("ca", "ca", plan.control_netns, argv,
                           Probe(plan.control_netns, "198.18.0.1", 15012, "/healthz"), 10.0)

    def agent(plan: LabPlan, node: NodePlan, labdir: LabDir) -> ProcessSpec:
        argv = (sys.executable, "-m", "lab.app", "--name", node.name, "--host", agent_host,
                "--port", "15021")
        return ProcessSpec(agent_name(node), f"{node.name}: agent", node.netns, argv,
                           Probe(node.netns, "127.0.0.1", 15021, "/healthz/ready"), 10.0)

    def issue_tokens(nodes: object, tokens_dir: Path, digest_file: Path) -> None:
        digest_file.write_text("{}")

    return Mesh(ca=ca, agent=agent, issue_tokens=issue_tokens)


def test_mesh_processes_start_after_the_network_and_stop_with_no_mesh(
        plan: LabPlan, labdir: LabDir) -> None:
    lines: list[str] = []
    description = lifecycle.read_description(None)
    # An agent that cannot bind exits at once: the error carries its log's last lines.
    with pytest.raises(LabFailure) as failure:
        lifecycle.up(labdir, description, stand_in_mesh(agent_host="192.0.2.1"), lines.append)
    assert str(failure.value) == (f"node-1: agent: exited before it was ready; last lines "
                                  f"of {labdir.log('agent-node-1')}:")
    assert "lab.app: error: node-1: port 15021: Cannot assign requested address" in (
        failure.value.details)

    lines.clear()
    lifecycle.up(labdir, description, stand_in_mesh(), lines.append)
    assert lines[6:] == ["[7/9] ca: ready at https://198.18.0.1:15012",
                         "[8/9] node-1: agent ready", "[9/9] node-2: agent ready",
                         "lab is up: 2 nodes, 5 pods, 2 services, mesh on"]
    mesh_pids = [supervisor.running_pid(labdir, n) for n in ("ca", "agent-node-1", "agent-node-2")]
    assert None not in mesh_pids

    lines.clear()
    lifecycle.up(labdir, description, None, lines.append)
    assert lines[6] == "[7/7] mesh: off (--no-mesh), stopped 3 processes"
    assert not any(supervisor.is_alive(pid) for pid in mesh_pids if pid)


def test_lab_processes_inherit_no_fds_of_their_starter(plan: LabPlan, labdir: LabDir,
                                                      tmp_path: Path) -> None:
    # As when `flock LOCK trellis lab up` starts the lab: the lock's fd must not
    # live on in the lab's daemons, or the lock stays taken for the lab's life.
    held = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)
    os.set_inheritable(held, True)
    try:
        pid = supervisor.spawn(labdir, ProcessSpec(
            "fd-probe", "fd probe", plan.nodes[0].netns, ("sleep", "30"),
            Probe(plan.nodes[0].netns, "127.0.0.1", 1), 1.0))
        try:
            deadline = time.monotonic() + 10  # `ip netns exec` first, then sleep
            while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert str(tmp_path / "lock") not in targets
        finally:
            # Not one of the lab's own programs, so supervisor.stop would leave it.
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            labdir.pid("fd-probe").unlink()
    finally:
        os.close(held)


def test_down_removes_everything_even_without_its_record_and_up_works_again(
        plan: LabPlan, labdir: LabDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pids = [int(p.read_text()) for p in labdir.pids.glob("*.pid")]
    assert len(pids) == 5
    # As after a crash that lost the record and the pid files: down must still find
    # the namespaces by their prefix and the processes inside them.
    labdir.record.unlink()
    for pid_file in labdir.pids.glob("*.pid"):
        pid_file.unlink()
    capsys.readouterr()
    assert trellis_lab("down") == 0
    assert capsys.readouterr().out.startswith("lab is down: stopped 5 processes, removed 8 ")
    assert network.lab_namespaces(plan.prefix) == []
    assert not any(supervisor.is_alive(pid) for pid in pids)
    assert not labdir.root.exists()

    assert trellis_lab("down") == 0
    assert capsys.readouterr().out == "nothing to remove: no lab is up\n"
    assert trellis_lab("status") == 1
    assert capsys.readouterr().err.startswith("trellis: error: no lab is up")

    # Up again, from a description of our own: three nodes, named by the pods.
    custom = tmp_path / "three.yaml"
    custom.write_text("".join(
        f"kind: Pod\nmetadata: {{name: web-{node}}}\nspec: {{nodeName: {node}}}\n---\n"
        for node in ("alpha", "beta", "gamma")))
    assert trellis_lab("up", "-f", str(custom), "--no-mesh") == 0
    assert len(network.lab_namespaces(plan.prefix)) == 1 + 3 + 3
    record = load_record(labdir)
    assert record is not None
    assert [(n.name, n.address) for n in record.plan.nodes] == [
        ("alpha", "198.18.0.11"), ("beta", "198.18.0.12"), ("gamma", "198.18.0.13")]
    answer = curl(pod(record.plan, "web-gamma")[0], "http://198.18.1.10:8080/")
    assert (answer["pod"], str(answer["peer"]).split(":")[0]) == ("web-alpha", "198.18.3.10")
