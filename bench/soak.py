"""The soak: thousands of connections held through the mesh at once, and what they cost.

Echo servers (``bench.holdconns serve``) run in the server pods; one holder
(``bench.holdconns hold``) per leg runs in its client pod, each leg crossing
between the nodes. The node proxies' RSS (VmRSS) and open descriptors
(/proc/PID/fd) are read:

- at baseline, after a small warm-up round (pools, TLS contexts and the
  allocator's first arenas exist, as they would in any proxy that has served);
- at the peak of each of two rounds, with every connection open and proven by
  an echo; a fresh request (the caller's ``probe``) is made in the first;
- after each round, polled with a deadline until the descriptors are back:
  within FD_SLACK of baseline, plus the HBONE tunnels the soak made that the
  pool keeps for its idle timeout (300 s; one per 100 streams, one descriptor on
  each end, read from ``trellis_hbone_pool_connections``).

RSS is not expected back at baseline, and is not: measured, a proxy keeps all
of it after 10,000 connections close. CPython frees a pymalloc arena only when
every object in it is gone, and glibc returns heap to the system only from its
top (or on malloc_trim), so a few objects that outlive the soak (a pooled
tunnel, a metrics child, a log record) pin pages filled while 10,000
connections lived. What must hold is that this memory is *reused*: the second
round, as large as the first, may raise the high-water mark by no more than
``regrowth_allowance_kb``. A leak grows with every round; retention does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Started, in_pod, python_module, rss_kb, wait_port
from lab import nsenter
from lab.lifecycle import Out

ECHO_PORT = 9090
WARMUP_CONNECTIONS = 100  # per leg
CONCURRENCY = 64  # connects in flight per holder: more only queues in the proxies
FD_SLACK = 16  # a scrape, a log rotation, a CA renewal in flight …
SETTLE_SECONDS = 30.0  # for the proxies' descriptors to be back after a round
WATCHDOG_GRACE = 30.0  # past a holder's own deadline, before it is killed
METRICS_PORT = 15020
POOL_GAUGE = "trellis_hbone_pool_connections"
# The second round may raise a proxy's RSS high-water mark by this much: a tenth of
# what the first round added (a leak of 1 KiB a connection, a twentieth of what one
# costs, would show as 10 MiB at 10,000), and no less than 8 MiB of noise.
REGROWTH_FRACTION = 0.1
REGROWTH_FLOOR_KB = 8 * 1024


@dataclass(frozen=True)
class Leg:
    """One direction of load: a holder in ``client_netns`` to the echo server at
    ``server_ip`` (in ``server_netns``)."""

    name: str
    client_netns: str
    server_netns: str
    server_ip: str
    connections: int
    client_cgroup: str = ""  # eBPF mode: the pods' cgroups
    server_cgroup: str = ""


@dataclass(frozen=True)
class NodeProxy:
    node: str
    pid: int
    netns: str  # the node's namespace, where its metrics listen on 127.0.0.1


@dataclass(frozen=True)
class Sample:
    rss_kb: int
    fds: int
    pool: int  # pooled HBONE tunnels this proxy dialled


@dataclass
class Round:
    """One round: every leg's connections opened, held, proven again, closed."""

    opened: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    first_failure: dict[str, str] = field(default_factory=dict)
    alive_at_end: int = 0
    open_seconds: float = 0.0
    peak: dict[str, Sample] = field(default_factory=dict)
    after: dict[str, Sample] = field(default_factory=dict)
    fds_back: bool = False  # descriptors back within bounds before the deadline
    back_seconds: float = 0.0


@dataclass
class SoakReport:
    connections: int  # per round
    baseline: dict[str, Sample] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    probe: str = ""

    def rss_kb_per_connection(self) -> float:
        first = self.rounds[0]
        grown = sum(first.peak[n].rss_kb - self.baseline[n].rss_kb for n in self.baseline)
        return grown / max(first.opened, 1)

    def fds_per_connection(self) -> float:
        first = self.rounds[0]
        grown = sum(first.peak[n].fds - self.baseline[n].fds for n in self.baseline)
        return grown / max(first.opened, 1)

    def regrowth_kb(self, node: str) -> int:
        """How far the last round raised ``node``'s RSS high-water mark of the first."""
        first, last = self.rounds[0], self.rounds[-1]
        mark = max(first.peak[node].rss_kb, first.after[node].rss_kb)
        return max(last.peak[node].rss_kb, last.after[node].rss_kb) - mark

    def regrowth_allowance_kb(self, node: str) -> float:
        grown = self.rounds[0].peak[node].rss_kb - self.baseline[node].rss_kb
        return max(REGROWTH_FLOOR_KB, REGROWTH_FRACTION * grown)

    def memory_reused(self) -> bool:
        return len(self.rounds) > 1 and all(
            self.regrowth_kb(n) <= self.regrowth_allowance_kb(n) for n in self.baseline)

    def lines(self) -> list[str]:
        out = [f"soak: fresh request during round 1: {self.probe or 'not made'}"]
        for number, r in enumerate(self.rounds, start=1):
            out.append(f"soak: round {number}: {r.opened}/{self.connections} connections open "
                       f"in {r.open_seconds:.1f} s, {r.failed} failed "
                       f"{r.failures or ''}{r.first_failure or ''}, {r.alive_at_end} still "
                       f"echoing at the end; fds back: {r.fds_back} after "
                       f"{r.back_seconds:.1f} s")
            for node, b in self.baseline.items():
                p, a = r.peak[node], r.after[node]
                out.append(f"soak:   {node} proxy RSS {b.rss_kb / 1024:.1f} -> "
                           f"{p.rss_kb / 1024:.1f} -> {a.rss_kb / 1024:.1f} MiB, fds {b.fds} "
                           f"-> {p.fds} -> {a.fds}, pooled tunnels {b.pool} -> {p.pool} -> "
                           f"{a.pool}")
        out.append(f"soak: per connection (both proxies together, round 1): "
                   f"{self.rss_kb_per_connection():.1f} KiB RSS, "
                   f"{self.fds_per_connection():.2f} fds")
        if len(self.rounds) > 1:
            out.append("soak: RSS high-water mark raised by round 2: " + ", ".join(
                f"{n} {self.regrowth_kb(n) / 1024:+.1f} MiB (allowed "
                f"{self.regrowth_allowance_kb(n) / 1024:.1f})" for n in self.baseline))
        return out

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "rss_kb_per_connection": self.rss_kb_per_connection(),
                "fds_per_connection": self.fds_per_connection(),
                "regrowth_kb": {n: self.regrowth_kb(n) for n in self.baseline}
                if len(self.rounds) > 1 else {}}


def fd_allowance(baseline: Mapping[str, Sample], now: Mapping[str, Sample]) -> int:
    """Descriptors over baseline a proxy may hold once the soak is over: the slack, and
    the tunnels pooled meanwhile (on two nodes each has one end on either proxy)."""
    return FD_SLACK + sum(max(0, now[n].pool - baseline[n].pool) for n in baseline)


def sample(proxy: NodeProxy) -> Sample:
    return Sample(rss_kb(proxy.pid), len(os.listdir(f"/proc/{proxy.pid}/fd")),
                  pool_connections(proxy.netns))


def pool_connections(netns: str) -> int:
    status, body = nsenter.http_get(netns, "127.0.0.1", METRICS_PORT, "/metrics", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"metrics in {netns} answered {status}")
    for line in body.decode().splitlines():
        if line.startswith(POOL_GAUGE + " "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"{POOL_GAUGE} missing from the metrics in {netns}")


def run_soak(legs: Sequence[Leg], proxies: Sequence[NodeProxy], probe: Callable[[], str],
             workdir: Path, out: Out, hold_seconds: float = 60.0, rounds: int = 2) -> SoakReport:
    """Warm up, measure baseline, then ``rounds`` times: hold every leg's connections
    (probing during the first), close, wait until the proxies' descriptors are back
    (or SETTLE_SECONDS pass). Everything started here is stopped here, by pid."""
    report = SoakReport(connections=sum(leg.connections for leg in legs))
    started = Started()
    try:
        _start_servers(legs, started, workdir)
        warm = [Leg(leg.name, leg.client_netns, leg.server_netns, leg.server_ip,
                    min(WARMUP_CONNECTIONS, leg.connections), leg.client_cgroup,
                    leg.server_cgroup) for leg in legs]
        _hold(warm, started, workdir, hold_seconds, lambda: None)
        report.baseline = _settled(proxies)
        out(f"soak: baseline {_brief(report.baseline)}")
        for number in range(1, rounds + 1):
            out(f"soak: round {number}: opening {report.connections} connections")
            report.rounds.append(_round(legs, proxies, started, workdir, hold_seconds,
                                        probe if number == 1 else None, report))
    finally:
        started.stop_all()
    for text in report.lines():
        out(text)
    return report


def _round(legs: Sequence[Leg], proxies: Sequence[NodeProxy], started: Started,
           workdir: Path, hold_seconds: float, probe: Callable[[], str] | None,
           report: SoakReport) -> Round:
    result = Round()

    def at_peak() -> None:
        result.peak = {p.node: sample(p) for p in proxies}
        if probe is not None:
            report.probe = probe()

    opened, closed = _hold(legs, started, workdir, hold_seconds, at_peak)
    result.opened = sum(int(o["open"]) for o in opened)
    result.failed = sum(int(o["failed"]) for o in opened)
    for line in opened:
        for kind, count in line["failures"].items():
            result.failures[kind] = result.failures.get(kind, 0) + int(count)
        result.first_failure.update(line["first_failure"])
    result.open_seconds = max(float(o["seconds"]) for o in opened)
    result.alive_at_end = sum(int(c["alive"]) for c in closed)
    _wait_fds_back(proxies, report.baseline, result)
    return result


def _start_servers(legs: Sequence[Leg], started: Started, workdir: Path) -> None:
    servers = {leg.server_netns: leg.server_cgroup for leg in legs}
    for netns, cgroup in servers.items():
        started.spawn(netns, [*python_module("bench.holdconns"), "serve",
                              "--port", str(ECHO_PORT)],
                      workdir / f"echo-{netns}.log", cgroup=cgroup)
    for netns in servers:
        wait_port(netns, "127.0.0.1", ECHO_PORT, 10.0)


def _hold(legs: Sequence[Leg], started: Started, workdir: Path, seconds: float,
          while_open: Callable[[], None]) -> tuple[list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """Every leg's holder at once; ``while_open`` runs when all of them hold their
    connections. Returns their "open" and "closed" lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent),
                    os.environ.get("PYTHONPATH")) if p))
    holders = []
    for leg in legs:
        argv = in_pod(leg.client_netns, [
            *python_module("bench.holdconns"), "hold", "--host", leg.server_ip,
            "--port", str(ECHO_PORT), "--connections", str(leg.connections),
            "--concurrency", str(CONCURRENCY), "--seconds", f"{seconds:g}"],
            leg.client_cgroup)
        with open(workdir / f"hold-{leg.client_netns}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, env=env, start_new_session=True)
        started.adopt(proc)
        holders.append(proc)
    # The holders bound themselves; this only catches one that hangs regardless.
    watchdogs = [threading.Timer(seconds + WATCHDOG_GRACE, p.kill) for p in holders]
    for w in watchdogs:
        w.start()
    try:
        opened = [_json_line(p, "open") for p in holders]
        try:
            while_open()
        finally:
            for p in holders:
                assert p.stdin is not None
                p.stdin.close()  # tells the holder to let go
        closed = [_json_line(p, "closed") for p in holders]
        for p in holders:
            p.wait(WATCHDOG_GRACE)
    finally:
        for w in watchdogs:
            w.cancel()
        for p in holders:
            started.stop(p)
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()
    return opened, closed


def _json_line(proc: subprocess.Popen[bytes], phase: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the holder's deadline, then the watchdog
    if not line:
        raise RuntimeError(f"holder {proc.pid} ended without its {phase!r} line "
                           f"(exit {proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    if result.get("phase") != phase:
        raise RuntimeError(f"holder {proc.pid}: expected the {phase!r} line, got {line!r}")
    return result


def _settled(proxies: Sequence[NodeProxy], seconds: float = 10.0) -> dict[str, Sample]:
    """Samples once the descriptors stop changing (the warm-up's closes have landed)."""
    deadline = time.monotonic() + seconds
    last = {p.node: sample(p) for p in proxies}
    while time.monotonic() < deadline:
        _pause(0.3)
        now = {p.node: sample(p) for p in proxies}
        if all(now[n].fds == last[n].fds for n in now):
            return now
        last = now
    return last


def _wait_fds_back(proxies: Sequence[NodeProxy], baseline: Mapping[str, Sample],
                   result: Round) -> None:
    begin = time.monotonic()
    while True:
        now = {p.node: sample(p) for p in proxies}
        result.after = now
        result.back_seconds = time.monotonic() - begin
        allowed = fd_allowance(baseline, now)
        if all(now[n].fds <= baseline[n].fds + allowed for n in now):
            result.fds_back = True
            return
        if result.back_seconds > SETTLE_SECONDS:
            return
        _pause(0.5)


def _pause(seconds: float) -> None:
    # A poll interval between reads of /proc, bounded by the callers' deadlines: no
    # event tells us that a proxy has released its sockets and memory.
    time.sleep(seconds)


def _brief(samples: Mapping[str, Sample]) -> str:
    return ", ".join(f"{n} {s.rss_kb / 1024:.1f} MiB / {s.fds} fds" for n, s in samples.items())
