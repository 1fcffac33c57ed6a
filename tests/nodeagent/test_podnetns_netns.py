"""The /proc scan on the real kernel: processes in real cgroup v2 directories named like
the kubelet's (both drivers), one inside a pod namespace, one in the host's."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.podnetns import ProcNetnsResolver
from tunnel.state import Workload

pytestmark = pytest.mark.netns

CGROUP2 = Path("/sys/fs/cgroup/unified")


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    if os.geteuid() != 0 or not (CGROUP2 / "cgroup.procs").exists():
        pytest.skip("needs root and cgroup v2 at /sys/fs/cgroup/unified")
    root = CGROUP2 / f"trellis-test-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        for directory in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
            if directory.is_dir():
                directory.rmdir()
        root.rmdir()


def start_in(cgroup: Path, *command: str) -> subprocess.Popen[bytes]:
    cgroup.mkdir(parents=True)
    # The shell joins the cgroup, then becomes the command: no window outside it.
    return subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"',
                             "sh", *command])


def workload(uid: str) -> Workload:
    return Workload(uid=uid, name="p", namespace="demo", node="n", ip="", service_account="sa",
                    labels={}, enrolled=True)


def test_finds_the_pod_namespace_and_never_the_hosts(netns: str, cgroup_root: Path) -> None:
    in_pod, host_net = str(uuid.uuid4()), str(uuid.uuid4())
    processes = [
        start_in(cgroup_root / "kubepods" / "besteffort" / f"pod{in_pod}",
                 "ip", "netns", "exec", netns, "sleep", "30"),
        start_in(cgroup_root / "kubepods.slice" /
                 f"kubepods-besteffort-pod{host_net.replace('-', '_')}.slice",
                 "sleep", "30"),  # a hostNetwork pod
    ]
    try:
        resolver = ProcNetnsResolver()
        deadline = time.monotonic() + 10
        found: dict[str, str] = {}
        while time.monotonic() < deadline and in_pod not in found:
            found = dict(resolver([workload(in_pod), workload(host_net)]))
            time.sleep(0.05)  # `ip netns exec` enters the namespace just after starting
        assert set(found) == {in_pod}
        assert os.stat(found[in_pod]).st_ino == os.stat(f"/run/netns/{netns}").st_ino
    finally:
        for process in processes:
            process.kill()
            process.wait()
