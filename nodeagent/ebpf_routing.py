"""eBPF mode's return path: a few ``ip rule``s and one sysctl in the pod, as data.

Every TCP peer the app can have at a foreign address is a proxy transparent
socket (tc hands all other inbound TCP to the proxy), so TCP the pod sends to a
non-local address is routed by table 100 (``local 0.0.0.0/0 dev lo``) back in
over ``lo``, where those sockets are. Three exceptions go to ``main`` first: the
proxy's own packets (mark 0x539), replies to kubelet probes, and HBONE (15008).
The catch-all is limited to ``iif lo`` (locally sent), so nothing arriving on
``eth0`` for a foreign address is taken as local.

One sysctl: the reverse-path check of a packet arriving on ``eth0`` looks up
like locally sent TCP and so meets the catch-all too, finding a local route;
``accept_local=1`` on that interface (only there, only in the pod) lets it pass.
The app's outgoing TCP never reaches these rules: connect4 already made it a
connect to 127.0.0.1:15001. Should connect4 be missing, such a connect is
refused locally rather than leaving the pod in plaintext (fail closed).
"""

from __future__ import annotations

import subprocess

from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.config import INBOUND_HBONE_PORT, PROXY_MARK
from tunnel.netns import NetnsHandle

MARK_MASK = 0xFFF
PROBE_SOURCE = "169.254.7.127"
ROUTE_TABLE = 100
# (priority, selector, table), in the form `ip rule show` prints them.
RETURN_RULES = (
    (32760, f"fwmark {PROXY_MARK:#x}/{MARK_MASK:#x}", "main"),
    (32761, f"to {PROBE_SOURCE}", "main"),
    (32762, f"ipproto tcp dport {INBOUND_HBONE_PORT}", "main"),
    (32763, "iif lo ipproto tcp", str(ROUTE_TABLE)),
)
LOCAL_ROUTE = ("local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE))


def routing_steps(interface: str, *, add: bool) -> list[list[str]]:
    """The commands that add (or remove) the return path, in a safe order: on
    add, the local route exists before any rule points at it."""
    verb = "add" if add else "del"
    rules = [["ip", "rule", verb, "priority", str(prio), *selector.split(), "lookup", table]
             for prio, selector, table in RETURN_RULES]
    route = ["ip", "route", verb, *LOCAL_ROUTE]
    accept_local = ["sysctl", "-qw", f"net.ipv4.conf.{interface}.accept_local={int(add)}"]
    return [accept_local, route, *rules] if add else [*rules, route, accept_local]


def apply_routing(pod: PodNetwork, ns: NetnsHandle, interface: str, timeout_s: float) -> None:
    for argv in routing_steps(interface, add=True):
        _run(pod, ns, argv, "File exists", timeout_s)


def remove_routing(pod: PodNetwork, ns: NetnsHandle, interface: str, timeout_s: float) -> None:
    for argv in routing_steps(interface, add=False):
        _run(pod, ns, argv, "No such", timeout_s)


def _run(pod: PodNetwork, ns: NetnsHandle, argv: list[str], harmless: str,
         timeout_s: float) -> None:
    """One command in the pod's namespace; ``harmless`` in stderr means "already so"."""
    fd = ns.fileno()
    command = ["nsenter", f"--net=/proc/self/fd/{fd}", *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout_s, pass_fds=(fd,))
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise RedirectError(pod, f"{' '.join(argv)}: {err}") from err
    if done.returncode != 0 and harmless not in done.stderr:
        raise RedirectError(pod, f"{' '.join(argv)} failed: {done.stderr.strip()}")
