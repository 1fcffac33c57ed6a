"""Namespace helpers for the redirection tests: pods are namespaces with one link."""

from __future__ import annotations

import subprocess

import pytest


def add_stub_link(ns: str, cidr: str, *, name: str = "eth0") -> None:
    """A link that goes nowhere, carrying ``cidr`` (and so a route to its subnet):
    a dummy, or a bridge without ports where the kernel has no dummy driver."""
    for kind in ("dummy", "bridge"):
        made = subprocess.run(["ip", "-n", ns, "link", "add", "name", name, "type", kind],
                              capture_output=True, text=True, check=False)
        if made.returncode == 0:
            break
    else:
        pytest.fail(f"cannot create a dummy or bridge link in {ns}: {made.stderr}")
    subprocess.run(["ip", "-n", ns, "addr", "add", cidr, "dev", name], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", name, "up"], check=True)


def connect_veth(ns_a: str, cidr_a: str, ns_b: str, cidr_b: str) -> None:
    """A veth pair between two namespaces, addressed on each side."""
    subprocess.run(["ip", "-n", ns_a, "link", "add", "name", "eth0", "type", "veth",
                    "peer", "name", "eth0", "netns", ns_b], check=True)
    for ns, cidr in ((ns_a, cidr_a), (ns_b, cidr_b)):
        subprocess.run(["ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)


@pytest.fixture(name="add_stub_link")
def _add_stub_link_fixture():  # type: ignore[no-untyped-def]
    return add_stub_link


@pytest.fixture(name="connect_veth")
def _connect_veth_fixture():  # type: ignore[no-untyped-def]
    return connect_veth
