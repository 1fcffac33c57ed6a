"""The lab's links, addresses and routes, applied over netlink with pyroute2.

pyroute2 does all of it (namespaces, veths across namespaces, bridges, addresses,
routes), so the lab never parses ``ip`` output; sysctls go through
lab/nsenter.py because netlink does not carry them.

Every ``ensure_*`` looks before it adds, so ``lab up`` can finish a half-built lab,
and returns whether it had to change anything. Everything lives inside the lab's
own namespaces: the host namespace is never touched, so deleting the namespaces
removes every link, address, route and rule the lab (or a node agent) made.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from lab import nsenter
from lab.plan import (
    CONTROL_ADDRESS,
    FABRIC_BRIDGE,
    POD_BRIDGE,
    POD_IFNAME,
    SUBNET_PREFIXLEN,
    UPLINK,
    LabPlan,
    NodePlan,
    PodPlan,
)

MAIN_TABLE = 254
IFF_UP = 0x1

# rp_filter=0 in pods: the proxy's transparent sockets send with the *client's*
# address from inside the server pod, which strict reverse-path checks drop.
POD_SYSCTLS = {
    "net/ipv4/conf/all/rp_filter": "0",
    "net/ipv4/conf/default/rp_filter": "0",
    f"net/ipv4/conf/{POD_IFNAME}/rp_filter": "0",
}
NODE_SYSCTLS = {"net/ipv4/ip_forward": "1"}


def lab_namespaces(prefix: str) -> list[str]:
    """Every namespace whose name carries the lab's prefix, made by this lab or a crashed one."""
    return sorted(n for n in pyroute2_netns.listnetns() if n.startswith(prefix))


def ensure_namespace(name: str) -> bool:
    if name in pyroute2_netns.listnetns():
        return False
    pyroute2_netns.create(name)
    return True


def delete_namespace(name: str) -> None:
    if name in pyroute2_netns.listnetns():
        pyroute2_netns.remove(name)


def ensure_control(plan: LabPlan) -> bool:
    """The control namespace: the fabric bridge every node's uplink plugs into."""
    changed = ensure_namespace(plan.control_netns)
    with IPRoute(netns=plan.control_netns) as ipr:
        changed |= _ensure_up(ipr, "lo")
        changed |= _ensure_bridge(ipr, FABRIC_BRIDGE, CONTROL_ADDRESS)
    return changed


def ensure_node(plan: LabPlan, node: NodePlan) -> bool:
    """A node namespace: uplink to the fabric, a pod bridge, routes to the other nodes' pods."""
    changed = ensure_namespace(node.netns)
    nsenter.write_sysctls(node.netns, NODE_SYSCTLS)
    with IPRoute(netns=node.netns) as ipr:
        changed |= _ensure_up(ipr, "lo")
        if not ipr.link_lookup(ifname=UPLINK):
            _drop_stale_peer(plan.control_netns, node.fabric_port)
            ipr.link("add", ifname=UPLINK, kind="veth",
                     peer={"ifname": node.fabric_port, "net_ns_fd": plan.control_netns})
            changed = True
        changed |= _ensure_address(ipr, UPLINK, node.address)
        changed |= _ensure_up(ipr, UPLINK)
        changed |= _ensure_bridge(ipr, POD_BRIDGE, node.gateway)
        for destination, via in plan.routes(node):
            changed |= _ensure_route(ipr, destination, via)
    with IPRoute(netns=plan.control_netns) as ctl:
        changed |= _ensure_port(ctl, node.fabric_port, FABRIC_BRIDGE)
    return changed


def ensure_pod(plan: LabPlan, pod: PodPlan) -> bool:
    """A pod namespace: eth0 on its node's pod bridge, default route via the node."""
    node = plan.node(pod.node)
    changed = ensure_namespace(pod.netns)
    with IPRoute(netns=pod.netns) as ipr:
        changed |= _ensure_up(ipr, "lo")
        if not ipr.link_lookup(ifname=POD_IFNAME):
            _drop_stale_peer(node.netns, pod.node_port)
            ipr.link("add", ifname=POD_IFNAME, kind="veth",
                     peer={"ifname": pod.node_port, "net_ns_fd": node.netns})
            changed = True
        nsenter.write_sysctls(pod.netns, POD_SYSCTLS)
        changed |= _ensure_address(ipr, POD_IFNAME, pod.ip)
        changed |= _ensure_up(ipr, POD_IFNAME)
        changed |= _ensure_route(ipr, "0.0.0.0/0", pod.gateway)
    with IPRoute(netns=node.netns) as nipr:
        changed |= _ensure_port(nipr, pod.node_port, POD_BRIDGE)
    return changed


def remove_pod(plan: LabPlan, pod: PodPlan) -> None:
    """Unplug and delete a pod's namespace.

    The veth goes first: a process still inside the namespace (say a shell from
    `lab exec`) would keep the namespace, and with it the veth and its address
    slot on the node, alive after the name is gone.
    """
    _drop_stale_peer(plan.node(pod.node).netns, pod.node_port)
    delete_namespace(pod.netns)


def _drop_stale_peer(netns: str, ifname: str) -> None:
    """Delete ``ifname`` in ``netns`` if it is left from a pair whose other end is gone."""
    if netns not in pyroute2_netns.listnetns():
        return
    with IPRoute(netns=netns) as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"interface {ifname} is missing in {ipr.status.get('netns')}")
    return int(found[0])


def _ensure_up(ipr: IPRoute, ifname: str) -> bool:
    index = _index(ipr, ifname)
    if ipr.get_links(index)[0]["flags"] & IFF_UP:
        return False
    ipr.link("set", index=index, state="up")
    return True


def _ensure_bridge(ipr: IPRoute, ifname: str, address: str) -> bool:
    changed = False
    if not ipr.link_lookup(ifname=ifname):
        ipr.link("add", ifname=ifname, kind="bridge")
        changed = True
    changed |= _ensure_address(ipr, ifname, address)
    return _ensure_up(ipr, ifname) or changed


def _ensure_port(ipr: IPRoute, ifname: str, bridge: str) -> bool:
    """``ifname`` is up and a port of ``bridge``."""
    index, master = _index(ipr, ifname), _index(ipr, bridge)
    link = ipr.get_links(index)[0]
    if link.get_attr("IFLA_MASTER") == master and link["flags"] & IFF_UP:
        return False
    ipr.link("set", index=index, master=master, state="up")
    return True


def _ensure_address(ipr: IPRoute, ifname: str, address: str) -> bool:
    """``address``/24 is the only IPv4 address on ``ifname``."""
    index = _index(ipr, ifname)
    present = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
               for a in ipr.get_addr(index=index, family=socket.AF_INET)}
    wanted = (address, SUBNET_PREFIXLEN)
    if present == {wanted}:
        return False
    for stale_address, prefixlen in present - {wanted}:
        ipr.addr("del", index=index, address=stale_address, prefixlen=prefixlen)
    if wanted not in present:
        ipr.addr("add", index=index, address=address, prefixlen=SUBNET_PREFIXLEN)
    return True


def _ensure_route(ipr: IPRoute, destination: str, via: str) -> bool:
    if (destination, via) in set(_routes(ipr)):
        return False
    network, prefixlen = destination.split("/")
    ipr.route("replace", dst=network, dst_len=int(prefixlen), gateway=via)
    return True


def _routes(ipr: IPRoute) -> Iterator[tuple[str, str]]:
    for route in ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE):
        gateway = route.get_attr("RTA_GATEWAY")
        if gateway:
            dst = route.get_attr("RTA_DST") or "0.0.0.0"
            yield f"{dst}/{route['dst_len']}", gateway
