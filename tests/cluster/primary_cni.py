"""The stand-in for the cluster's own CNI plugin (flannel, Calico, the bridge plugin):
the first plugin of the node's conflist. Standard library and ``ip`` only.

ADD: a veth between the node (a port of the ``bridge`` of its config) and the pod's
namespace (``CNI_NETNS``, named ``CNI_IFNAME``), the address from ``CNI_ARGS``
``IP=`` (as Calico takes one) in the config's ``subnet``, a default route via
``gateway``; prints the CNI 1.0 result. DEL: removes the veth (gone already is
fine). CHECK: the address is still on the interface. Errors are the spec's JSON
object with a non-zero exit.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys


def fail(code: int, msg: str) -> None:
    print(json.dumps({"cniVersion": "1.0.0", "code": code, "msg": msg}))
    sys.exit(1)


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        fail(999, f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    config = json.load(sys.stdin)
    command = os.environ["CNI_COMMAND"]
    if command == "VERSION":
        print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}))
        return
    netns = os.environ.get("CNI_NETNS", "")
    ifname = os.environ.get("CNI_IFNAME", "eth0")
    host_if = "tcv" + os.environ["CNI_CONTAINERID"][:12]
    name = os.path.basename(netns)
    if command == "DEL":
        ip("link", "del", host_if, check=False)
        return
    if os.path.dirname(netns) not in ("/run/netns", "/var/run/netns"):
        fail(4, f"CNI_NETNS {netns!r}: expected a namespace under /var/run/netns")
    args = dict(kv.split("=", 1) for kv in os.environ.get("CNI_ARGS", "").split(";") if kv)
    subnet = ipaddress.ip_network(config["subnet"])
    address = args.get("IP", "")
    if command == "CHECK":
        if address and f"inet {address}/" not in ip("-n", name, "addr", "show", ifname):
            fail(11, f"{ifname} in {name} lost {address}")
        return
    if command != "ADD":
        fail(4, f"unknown CNI_COMMAND {command}")
    if not address or ipaddress.ip_address(address) not in subnet:
        fail(7, f"CNI_ARGS IP={address!r} is not in {subnet}")
    ip("link", "add", host_if, "type", "veth", "peer", "name", ifname, "netns", name)
    ip("link", "set", host_if, "master", config["bridge"], "up")
    ip("-n", name, "link", "set", "lo", "up")
    ip("-n", name, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", ifname)
    ip("-n", name, "link", "set", ifname, "up")
    ip("-n", name, "route", "add", "default", "via", config["gateway"])
    print(json.dumps({
        "cniVersion": config.get("cniVersion", "1.0.0"),
        "interfaces": [{"name": host_if}, {"name": ifname, "sandbox": netns}],
        "ips": [{"address": f"{address}/{subnet.prefixlen}", "gateway": config["gateway"],
                 "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": config["gateway"]}],
        "dns": {}}))


if __name__ == "__main__":
    main()
