"""One repetition of every workload against one scenario's path, as figures.

The client side runs in the client pod (iperf3, ``bench.loadgen``); the proxy
CPU is read from /proc before and after each workload, so the figures are
CPU per GB and per 1,000 requests of the proxies alone.
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench.procs import in_pod, python_module, run_in, total_cpu, total_rss
from lab.lifecycle import Out

Figures = dict[str, float | None]
CLIENT_GRACE_SECONDS = 20.0  # beyond a client's own duration, before it is killed
HOLD_SECONDS = 60.0  # the most a hold may last if the bench died before closing it


@dataclass(frozen=True)
class Durations:
    bulk: int  # iperf3 counts whole seconds
    rr: float
    crr: float
    rate: float = 1000.0
    rr_connections: int = 10
    crr_concurrency: int = 4
    hold_connections: int = 1000


@dataclass(frozen=True)
class Path:
    """How a scenario's client reaches the servers, and whose CPU and RSS to read."""

    client_netns: str
    host: str
    iperf_port: int
    http_port: int
    proxy_pids: tuple[int, ...]
    client_cgroup: str = ""  # eBPF mode: the client pod's cgroup, where its programs are


def raise_fd_limits(pids: Sequence[int]) -> None:
    """1,000 held connections need more descriptors than the usual soft limit of 1024;
    raise each proxy's soft limit to its hard limit, as a service manager would."""
    for pid in pids:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


def bulk(path: Path, seconds: float, streams: int) -> tuple[float, float]:
    """(Gbit/s, bytes) received by the iperf3 server."""
    # iperf3 reads -t as a whole number, and 0 means "forever": at least one second.
    whole = max(1, round(seconds))
    argv = ["iperf3", "-c", path.host, "-p", str(path.iperf_port), "-t", str(whole),
            "-P", str(streams), "-J"]
    report = json.loads(run_in(path.client_netns, argv, seconds + CLIENT_GRACE_SECONDS,
                               path.client_cgroup))
    received = report["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, float(received["bytes"])


def loadgen(path: Path, mode: str, args: Sequence[str], seconds: float) -> dict[str, object]:
    argv = [*python_module("bench.loadgen"), mode, "--host", path.host,
            "--port", str(path.http_port), *args]
    result: dict[str, object] = json.loads(
        run_in(path.client_netns, argv, seconds + CLIENT_GRACE_SECONDS,
               path.client_cgroup).splitlines()[-1])
    return result


def hold_rss(path: Path, connections: int) -> tuple[int, int]:
    """(open connections, proxies' RSS KB) while ``connections`` are held open."""
    argv = in_pod(path.client_netns, [
        *python_module("bench.loadgen"), "hold", "--host", path.host,
        "--port", str(path.http_port), "--connections", str(connections),
        "--seconds", f"{HOLD_SECONDS:g}"], path.client_cgroup)
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            line = proc.stdout.readline()
            opened = int(json.loads(line)["open"]) if line else 0
            time.sleep(0.5)  # let the proxies settle their buffers
            rss = total_rss(path.proxy_pids)
        finally:
            proc.stdin.close()  # tells the holder to let go
            try:
                proc.wait(CLIENT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return opened, rss


def wait_answering(path: Path, seconds: float = 15.0) -> None:
    """Until an HTTP request through the path is answered: a fresh enrollment may
    still be fetching its certificate when its listeners are already up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = loadgen(path, "crr", ["--seconds", "0.2", "--concurrency", "1",
                                           "--max-count", "3"], 0.2)
            if _num(result["completed"]) > 0 and _num(result["errors"]) == 0:
                return
            problem = f"{_num(result['errors']):.0f} errors"
        except WORKLOAD_ERRORS as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer through {path.host}:{path.http_port} from "
                               f"{path.client_netns} within {seconds:.0f} s: {problem}")
        time.sleep(0.5)


# A workload that fails (a client timing out, a proxy refusing) leaves its figures
# out of this repetition; the run goes on, and the table shows what was measured.
WORKLOAD_ERRORS = (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError)


def measure(path: Path, d: Durations, out: Out) -> Figures:
    """Every workload once, in a fixed order; figures named as in the results JSON."""
    f: Figures = {"rss_kb_idle": float(total_rss(path.proxy_pids)) if path.proxy_pids
                  else None}
    for name, workload in (("bulk", _bulk), ("rr", _rr), ("crr", _crr), ("rss", _rss)):
        try:
            f.update(workload(path, d, out))
        except WORKLOAD_ERRORS as exc:
            out(f"{name} FAILED, left out of this repetition: {exc}")
    return f


def _bulk(path: Path, d: Durations, out: Out) -> Figures:
    cpu0 = total_cpu(path.proxy_pids)
    gbps1, bytes1 = bulk(path, d.bulk, 1)
    gbps4, bytes4 = bulk(path, d.bulk, 4)
    cpu = total_cpu(path.proxy_pids) - cpu0
    out(f"bulk {gbps1:.2f} / {gbps4:.2f} Gbit/s (1 / 4 streams)")
    return {"bulk_gbps_1": gbps1, "bulk_gbps_4": gbps4,
            "cpu_s_per_gb": cpu / ((bytes1 + bytes4) / 1e9) if path.proxy_pids else None}


def _rr(path: Path, d: Durations, out: Out) -> Figures:
    cpu0 = total_cpu(path.proxy_pids)
    rr = loadgen(path, "rr", ["--rate", f"{d.rate:g}", "--seconds", f"{d.rr:g}",
                              "--connections", str(d.rr_connections)], d.rr)
    cpu = total_cpu(path.proxy_pids) - cpu0
    completed = int(_num(rr["completed"]))
    f: Figures = {f"rr_p{q}_us": _opt(rr[f"p{q}_us"]) for q in (50, 90, 99)}
    f["rr_rate"] = _num(rr["rate"])
    proxies = bool(path.proxy_pids)
    f["cpu_s_per_1k_req"] = cpu / (completed / 1000) if proxies and completed else None
    f["vcpu_at_1k_rps"] = cpu / _num(rr["seconds"]) if proxies else None
    out(f"rr @{d.rate:g} rps: {f['rr_rate']:.0f} rps achieved, p50/p90/p99 "
        f"{f['rr_p50_us'] or 0:.0f}/{f['rr_p90_us'] or 0:.0f}/{f['rr_p99_us'] or 0:.0f} µs, "
        f"{_num(rr['errors']):.0f} errors")
    return f


def _crr(path: Path, d: Durations, out: Out) -> Figures:
    crr = loadgen(path, "crr", ["--seconds", f"{d.crr:g}",
                                "--concurrency", str(d.crr_concurrency)], d.crr)
    out(f"new connection per request: {_num(crr['rate']):.0f}/s, "
        f"{_num(crr['errors']):.0f} errors")
    return {"crr_per_s": _num(crr["rate"]), "crr_p50_us": _opt(crr["p50_us"]),
            "crr_p99_us": _opt(crr["p99_us"])}


def _rss(path: Path, d: Durations, out: Out) -> Figures:
    if not path.proxy_pids:
        return {"rss_kb_1k_conns": None}
    opened, rss = hold_rss(path, d.hold_connections)
    out(f"RSS with {opened} open connections {rss} KB")
    # Fewer than asked would flatter the proxy: no figure rather than a wrong one.
    return {"rss_kb_1k_conns": float(rss) if opened == d.hold_connections else None}


def _num(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


def _opt(value: object) -> float | None:
    return None if value is None else _num(value)
