"""`trellis bench`: every scenario on the same lab, in one run, repetitions interleaved.

Each repetition runs the scenarios one after the other (direct, trellis, envoy,
stunnel), so slow drift of the machine spreads over all of them instead of
landing on one. Servers (iperf3, bench.httpd) run in both server pods for
the whole run; peer proxies (Envoy, stunnel) start once, before the first
repetition, and everything this run started is stopped by pid at the end.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import chart, peers, report
from bench.certs import PeerCerts, make_peer_certs
from bench.labsetup import BenchLab, prepare, release
from bench.procs import Started, python_module, wait_port
from bench.workloads import Durations, Figures, measure, raise_fd_limits, wait_answering
from bench.workloads import Path as ClientPath
from lab.state import LabDir

Out = Callable[[str], None]
SCENARIOS = ("direct", "trellis", "envoy", "stunnel")
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
    started = Started()
    workdir = Path(tempfile.mkdtemp(prefix="trellis-bench-"))
    certs = make_peer_certs("spiffe://cluster.local/ns/bench/sa/plain-client",
                            "spiffe://cluster.local/ns/bench/sa/plain-server")
    lab = prepare(labdir, out)
    runs: dict[str, list[Figures]] = {name: [] for name in settings.scenarios}
    try:
        paths = _start_everything(settings.scenarios, lab, started, workdir, certs, out)
        steps = settings.repetitions * len(settings.scenarios)
        step = 0
        for rep in range(1, settings.repetitions + 1):
            for name in settings.scenarios:
                step += 1
                prefix = f"[{step}/{steps}] rep {rep} {name}: "
                runs[name].append(measure(paths[name], settings.durations,
                                          lambda line, p=prefix: out(p + line)))
    except BaseException:
        out(f"logs of this run's servers and peer proxies: {workdir}")
        raise
    else:
        shutil.rmtree(workdir, ignore_errors=True)  # kept only when the run failed
    finally:
        started.stop_all()
        certs.remove()
        release(lab, out, settings.keep_lab)
    return _write(settings, runs)


def _start_everything(scenarios: Sequence[str], lab: BenchLab, started: Started,
                      workdir: Path, certs: PeerCerts, out: Out) -> dict[str, ClientPath]:
    for server in (lab.mesh_server, lab.plain_server):
        started.spawn(server.netns, ["iperf3", "-s", "-p", str(IPERF_PORT)],
                      workdir / f"iperf3-{server.name}.log")
        started.spawn(server.netns, [*python_module("bench.httpd"), "--port", str(HTTP_PORT)],
                      workdir / f"httpd-{server.name}.log")
        for port in (IPERF_PORT, HTTP_PORT):
            wait_port(server.netns, "127.0.0.1", port, 10.0)
    client, server = lab.plain_client, lab.plain_server
    paths: dict[str, ClientPath] = {}
    for name in scenarios:
        if name == "direct":
            paths[name] = ClientPath(client.netns, server.ip, IPERF_PORT, HTTP_PORT, ())
        elif name == "trellis":
            paths[name] = ClientPath(lab.mesh_client.netns, lab.mesh_server.ip, IPERF_PORT,
                                     HTTP_PORT, lab.agent_pids)
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


def _write(settings: Settings, runs: dict[str, list[Figures]]) -> Outcome:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    meta = {"timestamp": stamp, "repetitions": settings.repetitions,
            "durations": asdict(settings.durations), "host": platform.node(),
            "kernel": platform.release(), "envoy_concurrency": peers.ENVOY_CONCURRENCY}
    document = report.results_document(runs, meta)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = settings.results_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    chart_path = chart.write_chart(report.summarize_runs(runs),
                                   settings.results_dir / f"{stamp}.png")
    return Outcome(json_path, chart_path, document)
