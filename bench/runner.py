"""`trellis bench`: every scenario in one run, repetitions interleaved.

Each repetition runs the scenarios one after the other (direct, trellis,
trellis-ebpf, envoy, stunnel), so slow drift of the machine spreads over all of
them instead of landing on one. ``trellis`` and ``trellis-ebpf`` are the mesh
in its two redirect modes; a lab has one mode, so one of them runs in a second
lab the bench brings up (bench/labsetup.py). Servers (iperf3, bench.httpd) run
in the server pods for the whole run; peer proxies (Envoy, stunnel) start once,
before the first repetition, and everything this run started is stopped by pid
at the end, before any lab the bench brought up goes down.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import chart, peers, report
from bench.certs import PeerCerts, make_peer_certs
from bench.labsetup import BenchLab, BenchLabs, bench_labs
from bench.procs import Started, python_module, wait_port
from bench.workloads import Durations, Figures, measure, raise_fd_limits, wait_answering
from bench.workloads import Path as ClientPath
from lab.lifecycle import Out
from lab.plan import PodPlan
from lab.state import LabDir

SCENARIOS = ("direct", "trellis", "trellis-ebpf", "envoy", "stunnel")
# The mesh scenarios and the redirect mode of each; the others use the plain pods.
MESH_SCENARIOS = {"trellis": "iptables", "trellis-ebpf": "ebpf"}
IPERF_PORT, HTTP_PORT = 5201, 8090
FULL = Durations(bulk=5, rr=10.0, crr=4.0)
QUICK = Durations(bulk=2, rr=2.0, crr=1.5)


@dataclass(frozen=True)
class Settings:
    scenarios: tuple[str, ...]
    repetitions: int
    durations: Durations
    results_dir: Path
    keep_lab: bool = False


@dataclass(frozen=True)
class Outcome:
    json_path: Path
    chart_path: Path | None
    document: dict[str, object]


def run(settings: Settings, labdir: LabDir, out: Out) -> Outcome:
    workdir = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    certs = make_peer_certs("spiffe://cluster.local/ns/bench/sa/plain-client",
                            "spiffe://cluster.local/ns/bench/sa/plain-server")
    modes = [MESH_SCENARIOS[n] for n in settings.scenarios if n in MESH_SCENARIOS]
    try:
        with bench_labs(labdir, modes, out, settings.keep_lab) as labs:
            runs = _measure(settings, labs, workdir, certs, out)
            labs_used = {mode: str(lab.labdir.root) for mode, lab in labs.meshes.items()}
    except BaseException:
        out(f"logs of this run's servers and peer proxies: {workdir}")
        raise
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # kept only when the run failed
    finally:
        certs.remove()
    return _write(settings, runs, labs_used)


def _measure(settings: Settings, labs: BenchLabs, workdir: Path, certs: PeerCerts,
             out: Out) -> dict[str, list[Figures]]:
    started = Started()
    runs: dict[str, list[Figures]] = {name: [] for name in settings.scenarios}
    try:
        paths = _start_everything(settings.scenarios, labs, started, workdir, certs, out)
        steps = settings.repetitions * len(settings.scenarios)
        step = 0
        for rep in range(1, settings.repetitions + 1):
            for name in settings.scenarios:
                step += 1
                prefix = f"[{step}/{steps}] rep {rep} {name}: "
                runs[name].append(measure(paths[name], settings.durations,
                                          lambda line, p=prefix: out(p + line)))
    finally:
        started.stop_all()  # while the labs, and so the pods these run in, still exist
    return runs


def server_pods(scenarios: Sequence[str], labs: BenchLabs) -> list[tuple[BenchLab, PodPlan]]:
    """The pods the scenarios' servers run in, each once: a mesh scenario's mesh-server
    in its mode's lab, and the main lab's plain-server for the others."""
    pods: list[tuple[BenchLab, PodPlan]] = []
    for name in scenarios:
        lab = labs.meshes[MESH_SCENARIOS[name]] if name in MESH_SCENARIOS else labs.main
        pod = lab.mesh_server if name in MESH_SCENARIOS else lab.plain_server
        if all(p.netns != pod.netns for _, p in pods):
            pods.append((lab, pod))
    return pods


def _start_everything(scenarios: Sequence[str], labs: BenchLabs, started: Started,
                      workdir: Path, certs: PeerCerts, out: Out) -> dict[str, ClientPath]:
    for lab, server in server_pods(scenarios, labs):
        cgroup = lab.cgroup(server)
        started.spawn(server.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                      workdir / f"iperf3-{server.netns}.log", cgroup=cgroup)
        started.spawn(server.netns, [*python_module("bench.httpd"), "--port", str(HTTP_PORT)],
                      workdir / f"httpd-{server.netns}.log", cgroup=cgroup)
        for port in (IPERF_PORT, HTTP_PORT):
            wait_port(server.netns, "127.0.0.1", port, 10.0)
    client, server = labs.main.plain_client, labs.main.plain_server
    paths: dict[str, ClientPath] = {}
    for name in scenarios:
        if name == "direct":
            paths[name] = ClientPath(client.netns, server.ip, IPERF_PORT, HTTP_PORT, ())
        elif name in MESH_SCENARIOS:
            lab = labs.meshes[MESH_SCENARIOS[name]]
            paths[name] = ClientPath(lab.mesh_client.netns, lab.mesh_server.ip, IPERF_PORT,
                                     HTTP_PORT, lab.agent_pids, lab.cgroup(lab.mesh_client))
        else:
            start = peers.start_envoy if name == "envoy" else peers.start_stunnel
            pair = start(started, workdir, certs, client.netns, server.netns,
                         server.ip, (IPERF_PORT, HTTP_PORT))
            paths[name] = ClientPath(client.netns, "127.0.0.1",
                                     peers.local_port(name, IPERF_PORT),
                                     peers.local_port(name, HTTP_PORT), pair.pids)
        raise_fd_limits(paths[name].proxy_pids)
        wait_answering(paths[name])
        out(f"{name}: ready (proxy pids {', '.join(map(str, paths[name].proxy_pids)) or 'none'})")
    return paths


def _write(settings: Settings, runs: dict[str, list[Figures]],
           labs_used: dict[str, str]) -> Outcome:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = {"timestamp": stamp, "repetitions": settings.repetitions,
            "durations": asdict(settings.durations), "host": platform.node(),
            "kernel": platform.release(), "envoy_concurrency": peers.ENVOY_CONCURRENCY,
            "labs_by_redirect_mode": labs_used}
    document = report.results_document(runs, meta)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = settings.results_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    chart_path = chart.write_chart(report.summarize_runs(runs),
                                   settings.results_dir / f"{stamp}.png")
    return Outcome(json_path, chart_path, document)
