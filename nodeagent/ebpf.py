"""In-pod redirection with eBPF (bpf/redirect.c): the iptables mode's behaviour, no netfilter.

Per pod: cgroup/connect4 and sockops links on the pod's cgroup, a tcx ingress
link on the pod's ``eth0``, the pod in the ``pods`` map, and the return path's
``ip rule``s. Per agent: the shared maps and one cgroup/getsockopt link on the
agent's own cgroup (where the proxy's sockets live). Everything is pinned under
the agent's bpffs root::

    <root>/maps/{orig,peer,pods}       shared maps (bcc pins them at load)
    <root>/getsockopt                  link on the proxy's cgroup
    <root>/getsockopt-previous         link on the cgroup of the proxy before it (a surge)
    <root>/pods/<uid>/{connect4,sockops,tc_ingress}   links
    <root>/pods/<uid>/state            one-slot map: the pod's netns cookie

A link lives as long as its pin, not as long as the agent: a restarted agent
finds the pins, re-checks them and attaches nothing twice; ``remove`` detaches
and unpins, and the last pod's removal takes the agent's maps and directory too.

The return path (ip rules, no mark from a program) is in ``ebpf_routing.py``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from nodeagent import bpf_sys, podcgroup
from nodeagent.ebpf_routing import apply_routing, remove_routing
from nodeagent.ebpf_support import EbpfUnavailable, cgroup2_mount, check_support
from nodeagent.pod_sysctl import enable_request_migration
from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.netns import NetnsError, NetnsHandle, inside, socket_in

log = logging.getLogger("trellis.nodeagent.redirect")

DEFAULT_BPF_ROOT = "/sys/fs/bpf/trellis"
SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "redirect.c"
SO_NETNS_COOKIE = 71
POD_LINKS = ("connect4", "sockops", "tc_ingress")


def pod_dirname(uid: str) -> str:
    """A pod UID as a bpffs file name (a file source's UID may be "ns/name")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", uid)


def own_cgroup(mount: str, pid: int | str = "self") -> str:
    """The cgroup v2 directory a process (this one by default) runs in: where its
    sockets belong."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return os.path.join(mount, line[3:].lstrip("/"))
    raise EbpfUnavailable(f"process {pid} has no cgroup v2 membership (/proc/{pid}/cgroup)")


class _Programs:
    """bpf/redirect.c compiled and loaded once per process, on first need."""

    def __init__(self, maps_dir: Path) -> None:
        from bcc import BPF, BPFAttachType, BPFProgType  # only in eBPF mode

        # bcc opens the maps pinned under maps_dir, or creates and pins them.
        # bcc wants bytes (it warns on str, and our warnings are errors).
        self._bpf = BPF(src_file=os.fsencode(SOURCE),
                        cflags=[f'-DPIN_DIR="{maps_dir}"'])
        load = self._bpf.load_func
        self.fds: dict[str, int] = {
            "connect4": load(b"trellis_connect4", BPFProgType.CGROUP_SOCK_ADDR,
                             attach_type=BPFAttachType.CGROUP_INET4_CONNECT).fd,
            "sockops": load(b"trellis_sockops", BPFProgType.SOCK_OPS).fd,
            "getsockopt": load(b"trellis_getsockopt", BPFProgType.CGROUP_SOCKOPT,
                               attach_type=BPFAttachType.CGROUP_GETSOCKOPT).fd,
            "tc_ingress": load(b"trellis_tc_ingress", BPFProgType.SCHED_CLS).fd,
        }

    def close(self) -> None:
        # bcc keeps itself alive through an atexit hook, so it must be told to let go.
        self._bpf.cleanup()


_ATTACH = {"connect4": bpf_sys.CGROUP_INET4_CONNECT, "sockops": bpf_sys.CGROUP_SOCK_OPS,
           "getsockopt": bpf_sys.CGROUP_GETSOCKOPT, "tc_ingress": bpf_sys.TCX_INGRESS}


class EbpfRedirector:
    """Redirection with bcc-loaded programs, pinned under ``bpf_root``."""

    name = "ebpf"

    def __init__(self, bpf_root: str = DEFAULT_BPF_ROOT, *, interface: str = "eth0",
                 proxy_cgroup: str = "", timeout_s: float = 10.0) -> None:
        check_support(bpf_root)
        self.root = Path(bpf_root)
        self.maps_dir = self.root / "maps"
        self.interface = interface
        self.proxy_cgroup = proxy_cgroup or own_cgroup(cgroup2_mount())
        self.timeout_s = timeout_s
        self._programs: _Programs | None = None
        self._lock = threading.Lock()  # the agent calls from executor threads

    # -- the Redirector protocol -------------------------------------------------

    def apply(self, pod: PodNetwork) -> None:
        try:
            ip = ipaddress.IPv4Address(pod.ip)
        except ValueError:
            raise RedirectError(pod, f"ip: {pod.ip!r} is not an IPv4 address") from None
        cgroup = self._pod_cgroup(pod)
        with self._lock, self._open(pod) as ns:
            try:
                cookie, ifindex = self._netns_facts(pod, ns)
                enable_request_migration(pod, ns)  # nodeagent/pod_sysctl.py
                apply_routing(pod, ns, self.interface, self.timeout_s)
                self._ensure_agent_state()
                with _pinned(self.maps_dir / "pods") as pods:
                    bpf_sys.map_update(pods, struct.pack("=Q", cookie),
                                       ip.packed + b"\0" * 4, f"pods map for {pod.key}")
                self._ensure_pod_links(pod, cgroup, ns, ifindex, cookie)
            except (bpf_sys.BpfError, NetnsError) as err:
                raise RedirectError(pod, str(err)) from err
        log.info("redirection applied", extra={"fields": {
            "pod": pod.key, "ip": pod.ip, "cgroup": cgroup, "redirect": self.name}})

    def remove(self, pod: PodNetwork) -> None:
        with self._lock:
            pod_dir = self.root / "pods" / pod_dirname(pod.uid)
            try:
                self._remove_pod_state(pod, pod_dir)
                with contextlib.suppress(NetnsError):  # gone with its pod: so are its rules
                    with NetnsHandle(pod.netns_path) as ns:
                        remove_routing(pod, ns, self.interface, self.timeout_s)
                self._remove_agent_state_if_idle()
            except bpf_sys.BpfError as err:
                raise RedirectError(pod, str(err)) from err
        log.info("redirection removed", extra={"fields": {"pod": pod.key, "redirect": self.name}})

    # -- per pod -------------------------------------------------------------------

    def _pod_cgroup(self, pod: PodNetwork) -> str:
        # No annotation (Kubernetes): the kubelet's per-pod cgroup, found by UID.
        cgroup = pod.cgroup or podcgroup.find(pod.uid, cgroup2_mount())
        if not cgroup:
            raise RedirectError(pod, "no cgroup known for the pod (metadata.annotations"
                                     "['trellis.dev/cgroup'], nor a process of it in /proc)")
        if not os.path.isfile(os.path.join(cgroup, "cgroup.procs")):
            raise RedirectError(pod, f"cgroup {cgroup!r} is not a cgroup v2 directory")
        return cgroup

    def _netns_facts(self, pod: PodNetwork, ns: NetnsHandle) -> tuple[int, int]:
        probe = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        with probe:
            (cookie,) = struct.unpack("=Q", probe.getsockopt(socket.SOL_SOCKET,
                                                              SO_NETNS_COOKIE, 8))
        with inside(ns):
            try:
                ifindex = socket.if_nametoindex(self.interface)
            except OSError:
                raise RedirectError(pod, f"no interface {self.interface!r} in the pod") from None
        return cookie, ifindex

    def _ensure_pod_links(self, pod: PodNetwork, cgroup: str, ns: NetnsHandle,
                          ifindex: int, cookie: int) -> None:
        pod_dir = self.root / "pods" / pod_dirname(pod.uid)
        if self._still_applied(pod_dir, cgroup, ns, ifindex, cookie):
            return  # applied before, perhaps by an earlier run of this agent
        self._remove_pod_state(pod, pod_dir, keep_pods_entry=True)
        pod_dir.mkdir(parents=True, exist_ok=True)
        state = bpf_sys.array_map_create(8, "trellis_state")
        try:
            bpf_sys.map_update(state, struct.pack("=I", 0), struct.pack("=Q", cookie), "state")
            bpf_sys.obj_pin(state, str(pod_dir / "state"))
        finally:
            os.close(state)
        fds = self._loaded().fds
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in ("connect4", "sockops"):
                _link_and_pin(fds[name], cg, _ATTACH[name], pod_dir / name, f"{name} to {cgroup}")
        finally:
            os.close(cg)
        with inside(ns):  # tcx resolves the ifindex in the calling thread's namespace
            _link_and_pin(fds["tc_ingress"], ifindex, _ATTACH["tc_ingress"],
                          pod_dir / "tc_ingress", f"tc ingress to {self.interface}")

    @staticmethod
    def _still_applied(pod_dir: Path, cgroup: str, ns: NetnsHandle, ifindex: int,
                       cookie: int) -> bool:
        """Pins complete, for this very namespace, and their programs still attached
        (a cgroup or an interface made anew since would have dropped them)."""
        if not _complete(pod_dir, (*POD_LINKS, "state")) or _state_cookie(pod_dir) != cookie:
            return False
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not all(_attached_at(pod_dir / n, cg, _ATTACH[n]) for n in ("connect4", "sockops")):
                return False
        finally:
            os.close(cg)
        with inside(ns):
            return _attached_at(pod_dir / "tc_ingress", ifindex, _ATTACH["tc_ingress"])

    def _remove_pod_state(self, pod: PodNetwork, pod_dir: Path,
                          keep_pods_entry: bool = False) -> None:
        if not pod_dir.exists():
            return
        cookie = _state_cookie(pod_dir)
        if cookie is not None and not keep_pods_entry and (self.maps_dir / "pods").exists():
            with _pinned(self.maps_dir / "pods") as pods:
                bpf_sys.map_delete(pods, struct.pack("=Q", cookie), f"pods map for {pod.key}")
        for name in POD_LINKS:
            _unpin_link(pod_dir / name)
        with contextlib.suppress(FileNotFoundError):
            (pod_dir / "state").unlink()
        pod_dir.rmdir()

    # -- per agent -----------------------------------------------------------------

    def _loaded(self) -> _Programs:
        if self._programs is None:
            self.maps_dir.mkdir(parents=True, exist_ok=True)
            try:
                self._programs = _Programs(self.maps_dir)
            except Exception as err:  # bcc raises bare Exception for compile/load errors
                raise bpf_sys.BpfError(errno.EINVAL, f"bpf/redirect.c: {err}") from err
        return self._programs

    def _ensure_agent_state(self) -> None:
        if not _complete(self.maps_dir, ("orig", "peer", "pods")):
            self._loaded()
        self._ensure_getsockopt()

    def _ensure_getsockopt(self) -> None:
        link = self.root / "getsockopt"
        cg = os.open(self.proxy_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if link.exists():
                if _attached_at(link, cg, _ATTACH["getsockopt"]):
                    return
                # Pinned for a proxy that ran in another cgroup (on Kubernetes, every
                # new container has its own): this proxy's sockets need it here.
                _unpin_link(link)
            _link_and_pin(self._loaded().fds["getsockopt"], cg, _ATTACH["getsockopt"], link,
                          f"getsockopt to {self.proxy_cgroup}")
        finally:
            os.close(cg)

    def follow_proxy(self, pid: int) -> None:
        """The proxy is process ``pid`` (``trellis proxy run``), not this one: answer
        SO_ORIGINAL_DST for the sockets in *its* cgroup, from now on."""
        cgroup = own_cgroup(cgroup2_mount(), pid)
        with self._lock:
            if cgroup == self.proxy_cgroup:
                return
            self.proxy_cgroup = cgroup
            if (self.root / "getsockopt").exists():  # pods are redirected already
                try:
                    self._keep_previous_getsockopt(cgroup)
                    self._ensure_getsockopt()
                except bpf_sys.BpfError as err:
                    raise OSError(err.errno, f"getsockopt link to {cgroup}: {err}") from err
        log.info("following the proxy's cgroup", extra={"fields": {
            "pid": pid, "cgroup": cgroup}})

    def _keep_previous_getsockopt(self, cgroup: str) -> None:
        """A surge upgrade: the proxy we followed until now still drains, and accepts
        until its SIGTERM; its sockets need SO_ORIGINAL_DST answered too. Its link
        stays, pinned as ``getsockopt-previous``, until the next move (by then that
        proxy is long gone; the kernel detaches a link whose cgroup is removed).
        (Not ``.previous``: bpffs refuses names with a dot.)
        One previous proxy is all a ``maxSurge: 1`` DaemonSet ever runs."""
        current, previous = self.root / "getsockopt", self.root / "getsockopt-previous"
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # A restarted agent starts out following itself; the pins the last
            # agent left may already be on this proxy's cgroup.
            if _attached_at(current, cg, _ATTACH["getsockopt"]):
                return
            back = previous.exists() and _attached_at(previous, cg, _ATTACH["getsockopt"])
        finally:
            os.close(cg)
        if back:  # the proxy we follow now is the previous one: swap, attach nothing twice
            tmp = self.root / "getsockopt-swap"
            os.rename(current, tmp)
            os.rename(previous, current)
            os.rename(tmp, previous)
            return
        _unpin_link(previous)
        os.rename(current, previous)  # bpffs renames a pin; the link stays attached

    def _remove_agent_state_if_idle(self) -> None:
        pods = self.root / "pods"
        if pods.exists() and any(pods.iterdir()):
            return
        _unpin_link(self.root / "getsockopt-previous")
        _unpin_link(self.root / "getsockopt")
        # Unpinned maps live on while a loaded program holds them; drop ours so
        # the next apply loads programs that use fresh, pinned maps.
        if self._programs is not None:
            self._programs.close()
            self._programs = None
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------

    @staticmethod
    def _open(pod: PodNetwork) -> NetnsHandle:
        try:
            return NetnsHandle(pod.netns_path)
        except NetnsError as err:
            raise RedirectError(pod, str(err)) from err


@contextlib.contextmanager
def _pinned(path: Path) -> Iterator[int]:
    fd = bpf_sys.obj_get(str(path))
    try:
        yield fd
    finally:
        os.close(fd)


def _complete(directory: Path, names: tuple[str, ...]) -> bool:
    return all((directory / name).exists() for name in names)


def _state_cookie(pod_dir: Path) -> int | None:
    try:
        with _pinned(pod_dir / "state") as fd:
            raw = bpf_sys.map_lookup(fd, struct.pack("=I", 0), 8, "state")
    except bpf_sys.BpfError:
        return None
    return None if raw is None else int(struct.unpack("=Q", raw)[0])


def _attached_at(pin: Path, target: int, attach_type: int) -> bool:
    """Whether the pinned link's program is attached at ``target`` right now."""
    with _pinned(pin) as fd:
        prog = bpf_sys.link_prog_id(fd)
    return prog in bpf_sys.prog_query(target, attach_type, str(pin))


def _link_and_pin(prog_fd: int, target: int, attach_type: int, pin: Path, what: str) -> None:
    link = bpf_sys.link_create(prog_fd, target, attach_type, what)
    try:
        bpf_sys.obj_pin(link, str(pin))
    except bpf_sys.BpfError:
        bpf_sys.link_detach(link, what)
        raise
    finally:
        os.close(link)


def _unpin_link(pin: Path) -> None:
    """Detach now (a link whose target is gone is already detached), then unpin."""
    if not pin.exists():
        return
    with contextlib.suppress(bpf_sys.BpfError), _pinned(pin) as fd:
        bpf_sys.link_detach(fd, str(pin))
    pin.unlink()

