"""The node's half of the kubelet probe exception: SNAT the host's own TCP to enrolled pods.

An enrolled pod captures all inbound TCP, so a kubelet probe would meet the
proxy and the pod's policy instead of the app: a tcpSocket probe would always
pass (the proxy accepts) and an HTTP probe could be denied. Istio's CNI agent
solves it on the host, and so do we, the same way: in the node's network
namespace, nat POSTROUTING rewrites the source of TCP that a *local socket*
sends to an enrolled pod's IP to 169.254.7.127 (``PROBE_SOURCE``), and the
pod's own rules (nodeagent/iptables.py, bpf/redirect.c) let exactly that source
through to the app. Packets the node only forwards (pod to pod, or from another
node) have no local socket, so ``-m owner --socket-exists`` never matches them.

Istio keeps the pod IPs in an ipset that one rule matches; we write one rule
per IP into our own chain instead, which needs no ipset tool or ``xt_set``
module, and replaces the whole set atomically in one ``iptables-restore
--noflush`` (declaring the chain flushes and refills it, as in iptables.py).
A node runs about a hundred pods at most, so the chain stays short.

Every host-network process counts as "the host" here, as in Istio: a
hostNetwork pod's connection to an enrolled pod is treated as a probe.

Rendering is pure and golden-tested (tests/nodeagent/golden/host_*.golden).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable

from nodeagent.iptables import (
    PROBE_SOURCE,
    NetnsCommandError,
    parse_save,
    render_removal,
    run_in_netns,
)
from tunnel.netns import NetnsError, NetnsHandle

log = logging.getLogger("trellis.nodeagent.host_probe")

CHAIN = "TRELLIS_HOST_POSTRT"
_TABLE = "nat"
_JUMP = f"-I POSTROUTING 1 -j {CHAIN}"


class HostRulesError(OSError):
    """The node's probe rule could not be installed or removed; the text says where."""


def _rule(ip: ipaddress.IPv4Address) -> str:
    # In the form iptables-save prints, so a save after an apply shows it verbatim.
    return (f"-A {CHAIN} -d {ip}/32 -p tcp -m owner --socket-exists"
            f" -j SNAT --to-source {PROBE_SOURCE}")


def _addresses(pod_ips: Iterable[str]) -> list[ipaddress.IPv4Address]:
    found: set[ipaddress.IPv4Address] = set()
    for value in pod_ips:
        try:
            found.add(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"pod IP {value!r} is not an IPv4 address") from None
    return sorted(found)


def render_host_rules(pod_ips: Iterable[str], existing_save: str = "") -> str:
    """Our chain, declared (emptied) and filled with one SNAT rule per pod IP, plus the
    jump from POSTROUTING when ``existing_save`` (``iptables-save -t nat``) lacks it.
    First in POSTROUTING: a masquerade rule above ours would rewrite the source first."""
    saved = parse_save(existing_save).get(_TABLE)
    has_jump = saved is not None and ("POSTROUTING", f"-j {CHAIN}") in saved.rules
    lines = ["*nat", f":{CHAIN} - [0:0]", *map(_rule, _addresses(pod_ips))]
    if not has_jump:
        lines.append(_JUMP)
    return "\n".join([*lines, "COMMIT"]) + "\n"


def render_host_removal(existing_save: str) -> str:
    """The jump and our chain out of the node's nat table ("" if neither is there)."""
    return render_removal(existing_save, prefix=CHAIN)


class HostProbeRules:
    """Keeps the node's SNAT rules equal to the set of enrolled pod IPs.

    ``netns_path`` is the node's network namespace: the agent's own when it runs
    on the host's network (the lab, a VM), ``/proc/1/ns/net`` from a pod that
    shares the host's PID namespace (the chart). Calls block (they run
    iptables); the agent makes them from a worker thread.
    """

    def __init__(self, netns_path: str, *, timeout_s: float = 10.0) -> None:
        self.netns_path = netns_path
        self.timeout_s = timeout_s
        self._applied: frozenset[str] | None = None  # None: this process has not looked yet
        self._lock = threading.Lock()

    def sync(self, pod_ips: Iterable[str]) -> bool:
        """Install exactly ``pod_ips``; no pods means no chain and no jump at all, so a
        node without enrolled pods carries nothing of ours. Returns whether it changed
        anything; an unchanged set costs nothing."""
        wanted = frozenset(pod_ips)
        with self._lock:
            if wanted == self._applied:
                return False
            with self._open() as ns:
                save = self._run(ns, ["iptables-save", "-t", _TABLE])
                change = render_host_rules(wanted, save) if wanted else render_host_removal(save)
                if change:
                    self._run(ns, ["iptables-restore", "--noflush"], change)
            self._applied = wanted
        log.info("host probe rules set", extra={"fields": {
            "netns": self.netns_path, "pods": len(wanted), "probe_source": PROBE_SOURCE}})
        return True

    def remove(self) -> None:
        """Take the chain and its jump out (uninstall); harmless when absent."""
        with self._lock:
            with self._open() as ns:
                removal = render_host_removal(self._run(ns, ["iptables-save", "-t", _TABLE]))
                if removal:
                    self._run(ns, ["iptables-restore", "--noflush"], removal)
            self._applied = frozenset()
        log.info("host probe rules removed", extra={"fields": {"netns": self.netns_path}})

    def _open(self) -> NetnsHandle:
        try:
            return NetnsHandle(self.netns_path)
        except NetnsError as err:
            raise HostRulesError(f"host probe rules: {err}") from err

    def _run(self, ns: NetnsHandle, argv: list[str], stdin: str | None = None) -> str:
        try:
            return run_in_netns(ns, argv, stdin, timeout_s=self.timeout_s)
        except NetnsCommandError as err:
            raise HostRulesError(f"host probe rules (netns {self.netns_path}): {err}") from err
