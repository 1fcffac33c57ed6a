"""`trellis bench soak`: the soak (bench/soak.py) at a larger count, on the bench's pods.

    trellis bench soak [--connections 10000] [--keep-lab]

Four fifths of the connections go from bench/mesh-client (node-1) to
bench/mesh-server (node-2), the rest the other way, so each node proxy carries
every connection (one side each). Prints the figures and writes
bench/results/soak-<timestamp>.json.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

from bench.labsetup import BenchLab, bench_labs
from bench.soak import ECHO_PORT, Leg, NodeProxy, SoakReport, run_soak
from lab import nsenter
from lab.lifecycle import Out
from lab.plan import PodPlan
from lab.state import LabDir, load_record

DEFAULT_CONNECTIONS = 10_000
FORWARD_SHARE = 0.8


def run(labdir: LabDir, connections: int, results_dir: Path, keep_lab: bool,
        out: Out) -> tuple[SoakReport, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="trellis-soak-"))
    try:
        with bench_labs(labdir, ["iptables"], out, keep_lab) as labs:
            report = run_soak(_legs(labs.main, connections), _proxies(labs.main),
                              lambda: _probe(labs.main), workdir, out,
                              hold_seconds=max(90.0, connections / 100))
    except BaseException:
        out(f"logs of the holders and echo servers: {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps({"timestamp": stamp, **report.as_json()}, indent=1,
                               default=str) + "\n")
    return report, path


def _legs(lab: BenchLab, connections: int) -> list[Leg]:
    forward = round(connections * FORWARD_SHARE)
    a, b = lab.mesh_client, lab.mesh_server
    return [_leg(lab, a, b, forward), _leg(lab, b, a, connections - forward)]


def _leg(lab: BenchLab, client: PodPlan, server: PodPlan, count: int) -> Leg:
    return Leg(f"{client.key} -> {server.key}", client.netns, server.netns, server.ip, count,
               lab.cgroup(client), lab.cgroup(server))


def _proxies(lab: BenchLab) -> list[NodeProxy]:
    record = load_record(lab.labdir)
    assert record is not None
    nodes = [record.plan.node(lab.mesh_client.node), record.plan.node(lab.mesh_server.node)]
    return [NodeProxy(node.name, pid, node.netns) for node, pid in zip(nodes, lab.agent_pids,
                                                                        strict=True)]


def _probe(lab: BenchLab) -> str:
    """A new connection and a request through the mesh while the soak holds the rest."""
    sock = nsenter.connect_in(lab.mesh_client.netns, lab.mesh_server.ip, ECHO_PORT, 10.0)
    with sock:
        sock.sendall(b"probe\n")
        answer = sock.recv(64)
    if answer != b"probe\n":
        raise RuntimeError(f"the probe during the soak got {answer!r}")
    return f"{lab.mesh_client.key} -> {lab.mesh_server.key}:{ECHO_PORT} echoed"
