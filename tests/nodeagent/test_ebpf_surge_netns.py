"""Issue 17 in eBPF mode: during a surge upgrade both proxies' cgroups get the
SO_ORIGINAL_DST (cgroup/getsockopt) program, the old one's until the next move.

Each "proxy" is a sleeping process in a cgroup of its own, as on Kubernetes,
where every proxy container has one; the agent follows it by pid (SO_PEERCRED).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ebpf_netns import PEER_IP, POD_IP, _progs_of

from nodeagent.ebpf import EbpfRedirector
from nodeagent.ebpf_support import cgroup2_mount
from nodeagent.redirect import PodNetwork

pytestmark = pytest.mark.netns


class _ProxyInCgroup:
    def __init__(self, cgroup: Path) -> None:
        self.cgroup = cgroup
        cgroup.mkdir()
        self.process = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec sleep 60'])

    def wait_in_cgroup(self) -> None:
        for _ in range(300):  # the shell moves itself first thing; bounded
            if str(self.process.pid) in (self.cgroup / "cgroup.procs").read_text().split():
                return
            subprocess.run(["sleep", "0.01"], check=True)
        raise AssertionError(f"pid {self.process.pid} never joined {self.cgroup}")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        self.cgroup.rmdir()


@pytest.fixture
def proxies() -> Iterator[list[_ProxyInCgroup]]:
    tag = uuid.uuid4().hex[:8]
    made = [_ProxyInCgroup(Path(cgroup2_mount()) / f"trellis-test-proxy-{tag}-{n}")
            for n in ("a", "b", "c")]
    try:
        for proxy in made:
            proxy.wait_in_cgroup()
        yield made
    finally:
        for proxy in made:
            proxy.stop()


@pytest.fixture
def pod(netns: str, peer_netns: str, cgroup: str, connect_veth) -> PodNetwork:  # type: ignore[no-untyped-def]
    connect_veth(netns, f"{POD_IP}/24", peer_netns, f"{PEER_IP}/24")
    return PodNetwork(uid=f"demo/app-{netns}", key="demo/app-1",
                      netns_path=f"/run/netns/{netns}", ip=POD_IP, cgroup=cgroup)


@pytest.fixture
def cgroup() -> Iterator[str]:
    path = Path(cgroup2_mount()) / f"trellis-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield str(path)
    finally:
        path.rmdir()


def _getsockopt_on(proxy: _ProxyInCgroup) -> int:
    return [t for _i, t in _progs_of(str(proxy.cgroup))].count("cgroup_getsockopt")


def test_both_proxies_cgroups_answer_so_original_dst_during_a_surge(
        pod: PodNetwork, proxies: list[_ProxyInCgroup]) -> None:
    a, b, c = proxies
    root = f"/sys/fs/bpf/trellis/test-{uuid.uuid4().hex[:8]}"
    redirector = EbpfRedirector(root)
    try:
        redirector.follow_proxy(a.process.pid)
        redirector.apply(pod)
        assert (_getsockopt_on(a), _getsockopt_on(b)) == (1, 0)
        redirector.follow_proxy(b.process.pid)  # B's socket appeared; A still drains
        assert (_getsockopt_on(a), _getsockopt_on(b)) == (1, 1)
        redirector.follow_proxy(b.process.pid)  # the same proxy again: nothing twice
        redirector.apply(pod)
        assert (_getsockopt_on(a), _getsockopt_on(b)) == (1, 1)
        # A restarted agent starts out following itself, then finds B's pins.
        again = EbpfRedirector(root)
        again.follow_proxy(b.process.pid)
        assert (_getsockopt_on(a), _getsockopt_on(b)) == (1, 1)
        # The next upgrade: A (two proxies back) is let go, B stays for its drain.
        again.follow_proxy(c.process.pid)
        assert (_getsockopt_on(a), _getsockopt_on(b), _getsockopt_on(c)) == (0, 1, 1)
        again.remove(pod)  # the last pod: every link goes, the previous one's too
        assert (_getsockopt_on(b), _getsockopt_on(c)) == (0, 0)
        assert not Path(root).exists()
    finally:
        redirector.remove(pod)
