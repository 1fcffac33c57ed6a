"""Finding a pod's network namespace from its cgroup, over a fake /proc; and the
Reconciler asking for it when the source (Kubernetes) names none."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from nodeagent.agent import Reconciler
from nodeagent.objects import parse_documents
from nodeagent.podnetns import ProcNetnsResolver, pod_uids_in_cgroup, scan

pytestmark = pytest.mark.unit

UID_A = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
UID_B = "11111111-2222-3333-4444-555555555555"
CGROUPFS = "0::/kubepods/besteffort/pod{uid}/4f3e2d1c0b\n"
SYSTEMD = ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
           "cri-containerd-9a8b7c.scope\n")


class FakeProc:
    """A /proc with processes: each has a cgroup file and an ns/net file whose inode
    stands for its namespace (hard links = the same namespace)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = root / "host-netns"
        self.host.write_text("")
        for name in ("self", "1"):
            self.process(name, "0::/init.scope\n", netns=self.host)

    def process(self, pid: str, cgroup: str, *, netns: Path | None = None) -> Path:
        (self.root / pid / "ns").mkdir(parents=True)
        (self.root / pid / "cgroup").write_text(cgroup)
        net = self.root / pid / "ns" / "net"
        if netns is None:
            net.write_text("")  # a namespace of its own
        else:
            os.link(netns, net)
        return net


def test_cgroup_names_both_driver_forms() -> None:
    assert pod_uids_in_cgroup(CGROUPFS.format(uid=UID_A)) == {UID_A}
    assert pod_uids_in_cgroup(SYSTEMD.format(uid=UID_A.replace("-", "_"))) == {UID_A}
    assert pod_uids_in_cgroup("0::/system.slice/containerd.service\n") == set()


def test_scan_takes_the_lowest_pid_of_each_pod(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    sandbox = proc.process("40", CGROUPFS.format(uid=UID_A))
    proc.process("41", CGROUPFS.format(uid=UID_A), netns=sandbox)  # the app container
    proc.process("300", SYSTEMD.format(uid=UID_B.replace("-", "_")))
    proc.process("7", "0::/system.slice/sshd.service\n")
    found = scan(tmp_path, [UID_A, UID_B, "not-running"], frozenset({proc.host.stat().st_ino}))
    assert found == {UID_A: str(tmp_path / "40" / "ns" / "net"),
                     UID_B: str(tmp_path / "300" / "ns" / "net")}


def test_a_host_network_pod_never_yields_the_host_namespace(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.process("50", CGROUPFS.format(uid=UID_A), netns=proc.host)
    assert ProcNetnsResolver(tmp_path)([_workload(UID_A)]) == {}


def test_vanishing_processes_are_skipped(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    proc.process("60", CGROUPFS.format(uid=UID_A)).unlink()  # exited mid-scan
    assert scan(tmp_path, [UID_A], frozenset()) == {}


def _snapshot(uid: str):  # type: ignore[no-untyped-def]
    return parse_documents([
        {"kind": "Namespace", "metadata": {"name": "demo",
                                           "labels": {"trellis.dev/dataplane-mode": "ambient"}}},
        {"kind": "Pod", "metadata": {"name": "web-1", "namespace": "demo", "uid": uid},
         "spec": {"nodeName": "node-1"}, "status": {"podIP": "10.1.0.11"}}], source="test")


def _workload(uid: str):  # type: ignore[no-untyped-def]
    return _snapshot(uid).state.workloads[0]


class _Proxy:
    def __init__(self) -> None:
        self.pods: dict[str, str] = {}

    def update_state(self, state: object) -> None:
        pass

    async def connect(self) -> int:
        return 0

    async def snapshot_sent(self) -> None:
        pass

    async def add_pod(self, workload, netns_path: str) -> None:  # type: ignore[no-untyped-def]
        self.pods[workload.uid] = netns_path

    async def remove_pod(self, uid: str) -> None:
        self.pods.pop(uid)


class _Redirector:
    name = "fake"

    def apply(self, pod: object) -> None:
        pass

    def remove(self, pod: object) -> None:
        pass


def test_reconciler_asks_the_resolver_and_keeps_a_served_pods_namespace(tmp_path: Path) -> None:
    proc = FakeProc(tmp_path)
    calls: list[list[str]] = []
    resolver = ProcNetnsResolver(tmp_path)

    def counting(workloads):  # type: ignore[no-untyped-def]
        workloads = list(workloads)
        calls.append([w.uid for w in workloads])
        return resolver(workloads)

    proxy = _Proxy()
    reconciler = Reconciler("node-1", proxy, _Redirector(),  # type: ignore[arg-type]
                            netns_resolver=counting)

    async def scenario() -> None:
        await reconciler.apply_snapshot(_snapshot(UID_A))
        assert proxy.pods == {} and "web-1" in (reconciler.not_ready_reason() or "")
        proc.process("40", CGROUPFS.format(uid=UID_A))  # the pod's sandbox starts
        await reconciler.reconcile()
        assert proxy.pods == {UID_A: str(tmp_path / "40" / "ns" / "net")}
        # A new snapshot (netns "" again) neither rescans nor re-enrolls it.
        await reconciler.apply_snapshot(_snapshot(UID_A))
        assert proxy.pods == {UID_A: str(tmp_path / "40" / "ns" / "net")}

    asyncio.run(scenario())
    assert calls == [[UID_A], [UID_A]]
    assert reconciler.not_ready_reason() is None
