"""In-pod redirection with iptables: rules as text, applied in one atomic restore.

Rendering is pure and golden-tested (tests/nodeagent/golden/); the redirector
runs ``iptables-save`` / ``iptables-restore --noflush`` inside the pod's
namespace with ``nsenter`` and adds the policy route with netlink. The rule set
is exactly ARCHITECTURE.md, "Marks and rules inside an enrolled pod".

Idempotence comes from the restore format itself: declaring our chains
(``:TRELLIS_X - [0:0]``) in a ``--noflush`` restore flushes and refills them, so
re-applying replaces rather than appends; the jumps into them from the built-in
chains are added only when ``iptables-save`` does not already show them.

The one sysctl set is ``net.ipv4.tcp_migrate_req`` (nodeagent/pod_sysctl.py: a
proxy upgrade's queued connections move to the new proxy). The return path to a
transparent socket was checked with
``rp_filter`` strict (1) and loose (2) on ``all`` and ``lo``: a reply the
mangle mark reroutes to table 100 loops over ``lo`` with its output route still
attached, so the receive side never does a route lookup and reverse-path
filtering never runs (tests/nodeagent/test_iptables_netns.py proves it).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import logging
import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.pod_sysctl import enable_request_migration
from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.config import INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, PROXY_MARK
from tunnel.netns import NetnsError, NetnsHandle, socket_in

log = logging.getLogger("trellis.nodeagent.redirect")

MARK_MASK = 0xFFF
# Set on connections the proxy opened transparently to the app, so that the
# app's replies can be steered back to the proxy (see the mangle rules).
CONNMARK = 0x111
# Where the host SNATs kubelet probes: the pod must answer them directly.
PROBE_SOURCE = "169.254.7.127"
ROUTE_TABLE = 100
RULE_PRIORITY = 32764  # just before the kernel's "lookup main" at 32766

CHAIN_PREFIX = "TRELLIS_"
PRERT = "TRELLIS_PRERT"
OUTPUT = "TRELLIS_OUTPUT"
TABLES = ("mangle", "nat")
_JUMPS = (("PREROUTING", PRERT), ("OUTPUT", OUTPUT))
_NETLINK_ROUTE = 0
# The proxy's listeners inside a pod: never a probe's destination.
_PROXY_PORTS = f"{OUTBOUND_PORT},{INBOUND_PLAINTEXT_PORT},{INBOUND_HBONE_PORT}"


def _rules(pod_ip: str) -> dict[str, tuple[str, ...]]:
    """Our chains' rules per table, in the canonical form ``iptables-save`` prints
    them, so a save after an apply shows them byte for byte."""
    try:
        ip = ipaddress.IPv4Address(pod_ip)
    except ValueError:
        raise ValueError(f"pod IP {pod_ip!r} is not an IPv4 address") from None
    mark = f"{PROXY_MARK:#x}/{MARK_MASK:#x}"
    connmark = f"{CONNMARK:#x}/{MARK_MASK:#x}"
    return {
        "mangle": (
            # Only the proxy's transparent connect to the app reaches PREROUTING still
            # carrying 0x539 (marks are scrubbed when a packet crosses namespaces, and
            # it loops over lo): remember that on its connection...
            f"-A {PRERT} -i lo -m mark --mark {mark} -j CONNMARK --set-xmark {connmark}",
            # ...so the app's replies, addressed to a foreign client IP, get 0x111 and
            # are routed by table 100 back over lo to the proxy, not out of the pod.
            f"-A {OUTPUT} -m connmark --mark {connmark} -j CONNMARK --restore-mark"
            f" --nfmask {MARK_MASK:#x} --ctmask {MARK_MASK:#x}",
        ),
        "nat": (
            # A kubelet probe, SNATed on the host to PROBE_SOURCE (nodeagent/host_probe.py),
            # reaches the app directly, as in Istio, and only that: to the pod's own IP
            # and never to a port of the proxy's (which would take the probe, or a
            # spoofed source, around the redirect and onto a listener directly). nat
            # sees only a connection's first packet, so this admits new inbound TCP only.
            f"-A {PRERT} -s {PROBE_SOURCE}/32 -d {ip}/32 -p tcp -m multiport"
            f" ! --dports {_PROXY_PORTS} -j ACCEPT",
            # HBONE arrives already tunnelled: straight to the proxy's real listener.
            f"-A {PRERT} -p tcp -m tcp --dport {INBOUND_HBONE_PORT} -j ACCEPT",
            f"-A {PRERT} -m mark --mark {mark} -j ACCEPT",
            f"-A {PRERT} ! -d 127.0.0.0/8 -p tcp -j REDIRECT --to-ports {INBOUND_PLAINTEXT_PORT}",
            # No exception for TCP *to* PROBE_SOURCE: a probe's replies belong to a
            # connection nat has already seen, so they never come here; a connection
            # the app opens to that address is the app's own, and is captured.
            # The pod talking to itself never leaves it, so there is nothing to secure.
            f"-A {OUTPUT} -d {ip}/32 -o lo -p tcp -j ACCEPT",
            f"-A {OUTPUT} -m mark --mark {mark} -j ACCEPT",
            f"-A {OUTPUT} -m connmark --mark {connmark} -j ACCEPT",
            # All of 127.0.0.0/8 is the pod's own loopback, as eBPF mode treats it: a
            # connection there never leaves the pod, and the proxy refuses it anyway.
            f"-A {OUTPUT} ! -d 127.0.0.0/8 -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
        ),
    }


def _declarations() -> tuple[str, ...]:
    return tuple(f":{chain} - [0:0]" for _builtin, chain in _JUMPS)


def _render(blocks: Mapping[str, Sequence[str]]) -> str:
    lines: list[str] = []
    for table, body in blocks.items():
        if body:
            lines += [f"*{table}", *body, "COMMIT"]
    return "\n".join(lines) + "\n" if lines else ""


@dataclass(frozen=True, slots=True)
class SavedTable:
    chains: tuple[str, ...]
    rules: tuple[tuple[str, str], ...]  # (chain, rule spec after "-A CHAIN ")


def parse_save(save: str) -> dict[str, SavedTable]:
    """``iptables-save`` output (with or without ``-c`` counters) → per table."""
    chains: dict[str, list[str]] = {}
    rules: dict[str, list[tuple[str, str]]] = {}
    table = ""
    for raw in save.splitlines():
        line = re.sub(r"^\[\d+:\d+\]\s+", "", raw.strip())
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, [])
            rules.setdefault(table, [])
        elif not table or not line or line.startswith(("#", "COMMIT")):
            continue
        elif line.startswith(":"):
            chains[table].append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            rules[table].append((chain, spec))
    return {t: SavedTable(tuple(chains[t]), tuple(rules[t])) for t in chains}


def jump_target(spec: str) -> str:
    try:
        words = shlex.split(spec)
    except ValueError:  # unbalanced quotes in somebody's comment: fall back to plain words
        words = spec.split()
    for flag, value in itertools.pairwise(words):
        if flag in ("-j", "--jump", "-g", "--goto"):
            return value
    return ""


def _missing_jumps(existing_save: str) -> dict[str, list[str]]:
    saved = parse_save(existing_save)
    missing: dict[str, list[str]] = {}
    for table in TABLES:
        present = set(saved[table].rules) if table in saved else set()
        # First in the built-in chain: a rule somebody else put there must not
        # let traffic skip the mesh.
        missing[table] = [f"-I {builtin} 1 -j {chain}" for builtin, chain in _JUMPS
                          if (builtin, f"-j {chain}") not in present]
    return missing


def render_rules(pod_ip: str) -> str:
    """Our chains, declared (so a ``--noflush`` restore empties them first) and filled."""
    return _render({t: (*_declarations(), *rules) for t, rules in _rules(pod_ip).items()})


def render_jumps(existing_save: str) -> str:
    """The jumps from the built-in chains that ``existing_save`` lacks ("" if none).
    Valid only together with, or after, ``render_rules``: the chains must exist."""
    return _render(_missing_jumps(existing_save))


def render_apply(pod_ip: str, existing_save: str) -> str:
    """Chains, rules and missing jumps as one restore input: one table block each,
    so the whole change commits at once."""
    jumps = _missing_jumps(existing_save)
    return _render({t: (*_declarations(), *rules, *jumps[t])
                    for t, rules in _rules(pod_ip).items()})


def render_removal(existing_save: str, *, prefix: str = CHAIN_PREFIX) -> str:
    """Delete every jump into a chain named ``prefix*``, then the chains ("" if none)."""
    blocks: dict[str, list[str]] = {}
    for table, saved in parse_save(existing_save).items():
        ours = [c for c in saved.chains if c.startswith(prefix)]
        jumps = [f"-D {chain} {spec}" for chain, spec in saved.rules
                 if chain not in ours and jump_target(spec) in ours]
        blocks[table] = [*jumps, *(f"-F {c}" for c in ours), *(f"-X {c}" for c in ours)]
    return _render(blocks)


def _explain(stderr: str, stdin: str | None) -> str:
    """iptables-restore names only a line number; quote the line it means."""
    message = " ".join(stderr.split()) or "no error output"
    found = re.search(r"line:?\s*(\d+)", stderr)
    if found and stdin:
        lines = stdin.splitlines()
        number = int(found.group(1))
        if 0 < number <= len(lines):
            message += f" [input line {number}: {lines[number - 1]}]"
    return message


class NetnsCommandError(OSError):
    """A tool run inside a namespace is missing, hung, or failed; the text says which."""


def run_in_netns(ns: NetnsHandle, argv: list[str], stdin: str | None = None, *,
                 timeout_s: float) -> str:
    """Run ``argv`` in the namespace ``ns`` and return its output."""
    # nsenter re-opens our fd (inherited at the same number), not the path: every
    # step acts on the namespace we opened even if the path is reused meanwhile.
    fd = ns.fileno()
    command = ["nsenter", f"--net=/proc/self/fd/{fd}", *argv]
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              timeout=timeout_s, pass_fds=(fd,), check=False)
    except FileNotFoundError as err:
        raise NetnsCommandError(f"{err.filename}: not installed") from err
    except subprocess.TimeoutExpired as err:
        raise NetnsCommandError(f"{' '.join(argv)}: no answer in {timeout_s} s") from err
    if done.returncode != 0:
        raise NetnsCommandError(f"{' '.join(argv)} failed (exit {done.returncode}): "
                                f"{_explain(done.stderr, stdin)}")
    return done.stdout


class IptablesRedirector:
    """Redirection with iptables rules and a policy route inside each pod's namespace."""

    name = "iptables"

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s

    def apply(self, pod: PodNetwork) -> None:
        try:
            ipaddress.IPv4Address(pod.ip)
        except ValueError:
            raise RedirectError(pod, f"ip: {pod.ip!r} is not an IPv4 address") from None
        with self._open(pod) as ns:
            enable_request_migration(pod, ns)  # before the rules: see nodeagent/pod_sysctl.py
            # Routing first: once the rules are in, the return path must already work.
            with self._rtnl(pod, ns) as ipr:
                self._add_routing(pod, ipr)
            save = self._run(pod, ns, ["iptables-save"])
            self._run(pod, ns, ["iptables-restore", "--noflush"], render_apply(pod.ip, save))
        log.info("redirection applied", extra={"fields": {
            "pod": pod.key, "ip": pod.ip, "netns": pod.netns_path, "redirect": self.name}})

    def remove(self, pod: PodNetwork) -> None:
        try:
            ns = NetnsHandle(pod.netns_path)
        except NetnsError as err:
            if err.errno == errno.ENOENT:
                return  # the namespace went with its pod, and every rule in it
            raise RedirectError(pod, str(err)) from err
        with ns:
            save = self._run(pod, ns, ["iptables-save"])
            removal = render_removal(save)
            if removal:
                self._run(pod, ns, ["iptables-restore", "--noflush"], removal)
            with self._rtnl(pod, ns) as ipr:
                self._remove_routing(pod, ipr)
        log.info("redirection removed", extra={"fields": {
            "pod": pod.key, "netns": pod.netns_path, "redirect": self.name}})

    @staticmethod
    def _open(pod: PodNetwork) -> NetnsHandle:
        try:
            return NetnsHandle(pod.netns_path)
        except NetnsError as err:
            raise RedirectError(pod, str(err)) from err

    def _run(self, pod: PodNetwork, ns: NetnsHandle, argv: list[str],
             stdin: str | None = None) -> str:
        try:
            return run_in_netns(ns, argv, stdin, timeout_s=self.timeout_s)
        except NetnsCommandError as err:
            raise RedirectError(pod, str(err)) from err

    @staticmethod
    @contextlib.contextmanager
    def _rtnl(pod: PodNetwork, ns: NetnsHandle) -> Iterator[IPRoute]:
        """An rtnetlink client bound to the pod's namespace (the socket is made there)."""
        sock = socket_in(ns, socket.AF_NETLINK, socket.SOCK_DGRAM, proto=_NETLINK_ROUTE)
        try:
            ipr = IPRoute(fileno=sock.fileno(), groups=0)
        except Exception as err:
            sock.close()
            raise RedirectError(pod, f"netlink: {err}") from err
        sock.detach()  # IPRoute owns the descriptor now
        try:
            yield ipr
        finally:
            ipr.close()

    @staticmethod
    def _add_routing(pod: PodNetwork, ipr: IPRoute) -> None:
        rule = dict(priority=RULE_PRIORITY, fwmark=CONNMARK, fwmask=MARK_MASK, table=ROUTE_TABLE)
        _netlink(pod, f"ip rule add fwmark {CONNMARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}",
                 errno.EEXIST, ipr.rule, "add", **rule)
        (lo,) = ipr.link_lookup(ifname="lo")
        # "local 0.0.0.0/0 dev lo": every address counts as ours, so a marked reply to a
        # foreign IP is delivered locally, to the proxy's transparent socket.
        _netlink(pod, f"ip route add local 0.0.0.0/0 dev lo table {ROUTE_TABLE}", errno.EEXIST,
                 ipr.route, "add", dst="0.0.0.0/0", type="local", scope="host",
                 oif=lo, table=ROUTE_TABLE)

    @staticmethod
    def _remove_routing(pod: PodNetwork, ipr: IPRoute) -> None:
        _netlink(pod, f"ip rule del fwmark {CONNMARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}",
                 errno.ENOENT, ipr.rule, "del", priority=RULE_PRIORITY, fwmark=CONNMARK,
                 fwmask=MARK_MASK, table=ROUTE_TABLE)
        _netlink(pod, f"ip route del local 0.0.0.0/0 table {ROUTE_TABLE}", errno.ESRCH,
                 ipr.route, "del", dst="0.0.0.0/0", type="local", scope="host",
                 table=ROUTE_TABLE)


def _netlink(pod: PodNetwork, what: str, harmless: int, call: Callable[..., object], *args: object,
             **kwargs: object) -> None:
    """Run one netlink change; ``harmless`` is the errno meaning "already so"."""
    try:
        call(*args, **kwargs)
    except NetlinkError as err:
        if err.code != harmless:
            raise RedirectError(pod, f"{what}: {err}") from err
