"""Processes the benchmark starts inside the lab's namespaces, and what it reads of
the proxies: CPU seconds (utime + stime from /proc/<pid>/stat, all threads) and
RSS (VmRSS from /proc/<pid>/status).

Everything started here is tracked by its own pid and stopped by that pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from lab import nsenter
from lab.redirect_mode import in_cgroup

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 3.0
_ROOT = str(Path(__file__).resolve().parent.parent)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far, every thread included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def total_rss(pids: Iterable[int]) -> int:
    return sum(rss_kb(p) for p in pids)


class Started:
    """The processes this run started; ``stop_all`` ends each by its pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, netns: str, argv: Sequence[str], log: Path,
              stdin: int | None = subprocess.DEVNULL, cgroup: str = "") -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        with open(log, "ab") as out:
            proc = subprocess.Popen(in_pod(netns, argv, cgroup), stdin=stdin,
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """A process another helper started, to be stopped with ours."""
        self.procs.append(proc)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def in_pod(netns: str, argv: Sequence[str], cgroup: str = "") -> list[str]:
    """``argv`` run in a pod's network namespace and, when given, its cgroup (eBPF
    mode: the pod's programs see only sockets of processes in the pod's cgroup).
    The cgroup is joined outside `ip netns exec`, whose fresh /sys hides cgroup v2."""
    return list(in_cgroup(cgroup, ["ip", "netns", "exec", netns, *argv]))


def run_in(netns: str, argv: Sequence[str], timeout: float, cgroup: str = "") -> str:
    """Run a client in ``netns`` to completion (bounded by ``timeout``); its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(in_pod(netns, argv, cgroup), capture_output=True,
                          timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} in {netns} failed ({done.returncode}): "
                           + " | ".join(tail))
    return done.stdout.decode()


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def wait_port(netns: str, host: str, port: int, seconds: float) -> None:
    """Until something accepts on host:port inside ``netns``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            nsenter.connect_in(netns, host, port, timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} in {netns} "
                                   f"after {seconds:.0f} s") from None
            time.sleep(0.1)
