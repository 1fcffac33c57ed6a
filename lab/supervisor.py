"""Starting, checking and stopping the lab's processes, always by their own pid.

A process is started detached (its own session, stdout and stderr to its log,
its pid in pids/<name>.pid) so it outlives the `trellis lab` command that started
it. Stopping reads the pid file, checks the pid still runs one of our programs
(pids are reused), sends SIGTERM, and SIGKILL after a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import resource
import signal
import ssl
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pyroute2 import netns as pyroute2_netns

from lab import nsenter
from lab.errors import LabError, LabFailure
from lab.processes import Port, Probe, ProcessSpec
from lab.redirect_mode import in_cgroup
from lab.state import LabDir

LOG_TAIL_LINES = 20
# Descriptors every lab process may open: a node proxy holding 10,000 connections
# (the soak, tests/e2e/test_soak.py) needs two or more each. The proxy still sets
# its own soft limit; this is the ceiling it can reach, whatever the shell gave us.
LAB_NOFILE = 1 << 16
STOP_GRACE_SECONDS = 5.0
# What the lab starts is `python -m lab.app` or `python -m trellis …`, run through
# `ip netns exec` (which execs in place, so the pid stays the same).
_OUR_MODULES = ("lab.app", "trellis")
_LAB_ROOT = str(Path(__file__).resolve().parent.parent)


def spawn(labdir: LabDir, spec: ProcessSpec) -> int:
    """Start ``spec`` detached; return its pid (already written to its pid file)."""
    labdir.logs.mkdir(parents=True, exist_ok=True)
    labdir.pids.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must import lab/ and trellis/ from the same tree as this process.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_LAB_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    log = str(labdir.log(spec.name))
    # The cgroup is joined outside `ip netns exec`, which remounts /sys (and so hides
    # the cgroup v2 mount under /sys/fs/cgroup).
    enter = (["nsenter", f"--net=/run/netns/{spec.netns}"] if spec.host_mounts
             else ["ip", "netns", "exec", spec.netns])
    argv = list(in_cgroup(spec.cgroup, [*enter, *spec.argv]))
    raise_nofile(LAB_NOFILE)
    # posix_spawn, not Popen: no Popen object that warns when dropped while its child
    # runs on, and setsid so a Ctrl-C at the terminal does not reach the lab.
    pid = os.posix_spawnp(argv[0], argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds()),
    ])
    labdir.pid(spec.name).write_text(f"{pid}\n")
    return pid


def raise_nofile(wanted: int) -> None:
    """Raise this process's RLIMIT_NOFILE (soft and hard) to at least ``wanted``, as far
    as the kernel allows: posix_spawn has no per-child limit, and children inherit ours.
    Never lowers a limit; without the privilege to raise the hard one, keeps it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError):
        ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
        wanted = min(wanted, ceiling)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(wanted, hard)), hard))


def _inherited_fds() -> list[int]:
    """Inheritable fds above stderr: a lab process must not hold what its starter
    held (a `flock` lock around `trellis lab up` would otherwise stay taken for the
    lab's whole life)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
        except OSError:  # the directory's own fd, closed by now
            continue
    return fds


def running_pid(labdir: LabDir, name: str) -> int | None:
    """The pid in pids/<name>.pid if that process is alive and is one of ours."""
    pid = _pid_in_file(labdir, name)
    return pid if pid is not None and is_alive(pid) and _is_ours(pid) else None


def _pid_in_file(labdir: LabDir, name: str) -> int | None:
    try:
        return int(labdir.pid(name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def ensure_ports_free(ports: Iterable[Port]) -> None:
    for port in ports:
        if nsenter.port_in_use(port.netns, port.port):
            raise LabError(f"{port.owner}: port {port.port} ({port.what}): already in use "
                           f"in network namespace {port.netns}, by something the lab "
                           f"did not start; find it with `ip netns exec {port.netns} ss -ltnp`")


def wait_ready(labdir: LabDir, specs: Sequence[ProcessSpec]) -> None:
    """Wait until every process answers its probe; fail on the first that dies or times out."""
    start = time.monotonic()
    # Liveness only, not _is_ours(): until a child has exec'd, its command line is
    # still this process's. These pids were just spawned or just checked.
    pids = {spec.name: _pid_in_file(labdir, spec.name) for spec in specs}
    pending = list(specs)
    pause = 0.02
    while pending:
        for spec in list(pending):
            pid = pids[spec.name]
            if pid is None or not is_alive(pid):
                raise _failure(labdir, spec, "exited before it was ready")
            error = probe(spec.ready)
            if error is None:
                pending.remove(spec)
            elif time.monotonic() - start > spec.ready_seconds:
                raise _failure(labdir, spec, f"not ready after {spec.ready_seconds:.0f} s "
                                             f"(last probe: {error})")
        if pending:
            time.sleep(pause)
            pause = min(pause * 2, 0.25)


def probe(p: Probe) -> str | None:
    """None when ready, else why not (one short phrase)."""
    try:
        if not p.path:
            nsenter.connect_in(p.netns, p.host, p.port, timeout=1.0).close()
            return None
        if p.cafile is not None and not os.path.exists(p.cafile):
            return f"{p.cafile} does not exist yet"
        status, _ = nsenter.http_get(p.netns, p.host, p.port, p.path, timeout=1.0,
                                     cafile=p.cafile, server_hostname=p.server_name)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        return f"{p.host}:{p.port}{p.path}: {exc}"
    return None if status == 200 else f"{p.host}:{p.port}{p.path} answered {status}"


def stop(labdir: LabDir, names: Iterable[str], grace: float = STOP_GRACE_SECONDS) -> int:
    """Stop the named processes together; remove their pid files. Returns how many ran."""
    pids = {}
    for name in names:
        pid = running_pid(labdir, name)
        if pid is not None:
            pids[name] = pid
        with contextlib.suppress(FileNotFoundError):
            labdir.pid(name).unlink()
    terminate(list(pids.values()), grace)
    return len(pids)


def pid_file_names(labdir: LabDir) -> list[str]:
    if not labdir.pids.is_dir():
        return []
    return sorted(p.stem for p in labdir.pids.glob("*.pid"))


def processes_in(netns_names: Iterable[str]) -> list[int]:
    """Every process inside the given namespaces (a shell from `lab exec`, a stray app …)."""
    wanted = set(netns_names)
    return sorted(pid for name, pids in pyroute2_netns.ns_pids().items() if name in wanted
                  for pid in pids if pid != os.getpid())


def terminate(pids: Sequence[int], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL whatever still runs after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        alive = [pid for pid in pids if is_alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while any(is_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def is_alive(pid: int) -> bool:
    """Running, and not a zombie (a zombie child of ours is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]  # after "(comm)", which may hold spaces
    return state not in ("Z", "X")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> tuple[str, ...]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ("(no log written)",)
    return tuple(text.splitlines()[-lines:]) or ("(log is empty)",)


def _failure(labdir: LabDir, spec: ProcessSpec, what: str) -> LabFailure:
    log = labdir.log(spec.name)
    return LabFailure(f"{spec.label}: {what}; last lines of {log}:", log_tail(log))


def _is_ours(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    args = [a.decode(errors="replace") for a in argv]
    if args[:3] == ["ip", "netns", "exec"]:  # the instant before `ip` execs the program
        return True
    return any(a == "-m" and b in _OUR_MODULES for a, b in itertools.pairwise(args))
