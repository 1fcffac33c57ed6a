"""Start one process the way a container runtime starts a container (stdlib only).

Run as root on the machine's host: ``python launch.py SPEC.json``. SPEC says which
cgroup, network namespace and PID namespace to join (or to make), the volumes
to mount, and the command with its ``setpriv`` prefix. In order:

1. join the container's cgroup (so nothing of it runs outside, and the agent's
   /proc scan finds the pod UID in its path, as the kubelet's cgroups name it);
2. enter the pod's network namespace, and its "node's" PID namespace (hostPID, or
   the parent of a pod's own PID namespace, which is made next unless hostPID);
3. a mount namespace of its own, slave to the host's (HostToContainer: network
   namespaces mounted later under /run/netns show up), and a root filesystem that
   is an overlay of the host's (the "image": this machine's /usr and the project's
   venv), with its own /proc, the volumes bound in (host paths mapped to the
   node's directory), ``/etc/hosts`` as the kubelet writes it, then remounted
   read-only when ``readOnlyRootFilesystem`` says so;
4. fork (a PID namespace takes effect in children); the parent stays to pass
   SIGTERM/SIGINT on and to exit with the child's status, the child chroots and
   execs the command.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
MS_PRIVATE, MS_SLAVE = 1 << 18, 1 << 19
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {source} on {target}")


def setns(path: str, kind: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, kind), f"setns {path}")
    finally:
        os.close(fd)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def inside(root: str, path: str) -> str:
    """``path`` of the container resolved under ``root``: an absolute symlink on the
    way (/var/run → /run) points into the container's root, never the host's."""
    resolved = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = os.path.join(resolved, part)
        if os.path.islink(candidate) and hops < 40:
            hops += 1
            link = os.readlink(candidate)
            parts = [p for p in link.split("/") if p] + parts
            resolved = root if link.startswith("/") else resolved
            continue
        resolved = candidate
    return resolved


def build_root(spec: dict) -> str:
    stage = spec["stage"]  # a directory of the harness's; the tmpfs hides it from the host
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for sub in ("upper", "work", "root"):
        os.mkdir(os.path.join(stage, sub))
    root = os.path.join(stage, "root")
    mount("overlay", root, "overlay", 0,
          f"lowerdir=/,upperdir={stage}/upper,workdir={stage}/work")
    for path in spec.get("readable", []):  # the image's code is world-readable
        here = inside(root, path)
        os.chmod(here, os.stat(here).st_mode | 0o005)
    mount("/dev", inside(root, "/dev"), None, MS_BIND | MS_REC)
    mount("/sys", inside(root, "/sys"), None, MS_BIND | MS_REC)
    mount("proc", inside(root, "/proc"), "proc", MS_NOSUID | MS_NODEV)
    for volume in sorted(spec.get("mounts", []), key=lambda m: m["target"].count("/")):
        target = inside(root, volume["target"])
        if os.path.isdir(volume["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "w").close()
        mount(volume["source"], target, None, MS_BIND | MS_REC)
        if volume.get("readOnly"):
            mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if "hosts" in spec:
        with open(inside(root, "/etc/hosts"), "w") as hosts:
            hosts.write(spec["hosts"])
    if spec.get("readOnlyRoot"):
        mount("none", root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    return root


def fork_and_forward() -> None:
    """Go on in a child; this process passes SIGTERM/SIGINT to it and exits with its
    status (a PID namespace applies to children only)."""
    child = os.fork()
    if child == 0:
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: os.kill(child, s))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec.get("cgroup"):
        with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))
    if spec.get("netns"):
        setns(spec["netns"], CLONE_NEWNET)
    if spec.get("pidns"):
        setns(spec["pidns"], CLONE_NEWPID)
        if spec.get("newPidns"):
            fork_and_forward()  # unshare(NEWPID) needs to be *in* the parent namespace
    if spec.get("newPidns"):
        unshare(CLONE_NEWPID)
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_SLAVE)
    fork_and_forward()
    try:
        root = build_root(spec) if spec.get("stage") else "/"
        os.chroot(root)
        os.chdir(spec.get("cwd", "/"))
        os.execvpe(spec["argv"][0], spec["argv"], spec.get("env", {}))
    except BaseException as exc:
        print(f"launch: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main()
