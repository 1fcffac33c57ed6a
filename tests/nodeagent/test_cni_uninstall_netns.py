"""The agent's last step on SIGTERM: keep every pod's rules on an upgrade, remove them
on an uninstall (issue 17, defect 6). Real iptables in fresh namespaces, the real
reconciler and CNI server, a stand-in API server answering for the chart's DaemonSet.
One pod is served by the reconciler; the other only went through CNI ADD (the
reconciler has not served it yet), and an uninstall must clean both."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from cni_support import OWNER, ApiServer, kubeconfig
from demo_snapshots import pod, snapshot
from test_reconciler import FakeProxy

from nodeagent.agent import Reconciler
from nodeagent.cni.lifecycle import OWNER_ENV, stop_redirection
from nodeagent.cni.protocol import PodRequest
from nodeagent.cni_server import CniServer
from nodeagent.iptables import IptablesRedirector
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState

pytestmark = pytest.mark.netns

POD_IP = "198.18.211.7"
CNI_POD_IP = "198.18.211.8"


def _trellis_rules(ns: str) -> bool:
    save = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True,
                          text=True, check=True).stdout
    return "TRELLIS" in save


async def _enrol_then_stop(ns: str, cni_ns: str, tmp_path: Path, state: str | None) -> bool:
    server = ApiServer()
    await server.start()
    try:
        server.state = state or "present"
        redirector = IptablesRedirector()
        reconciler = Reconciler("node-1", FakeProxy(), redirector)  # type: ignore[arg-type]
        await reconciler.apply_snapshot(snapshot(pod(ns, POD_IP)))
        cni = CniServer(tmp_path / "cni.sock", redirector, lambda: MeshState(
            namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}}))
        added = await cni.handle(PodRequest("add", "ctr-1", f"/run/netns/{cni_ns}", CNI_POD_IP,
                                            "demo", "new-pod", "uid-new"))
        # Positive controls: both pods are redirected before the agent stops.
        assert added.ok and reconciler.served_count == 1
        assert _trellis_rules(ns) and _trellis_rules(cni_ns)
        return await stop_redirection(reconciler, kubeconfig(tmp_path / "kc", server.url),
                                      cni.applied())
    finally:
        await server.stop()


@pytest.mark.parametrize(("state", "removed"), [
    ("gone", True), ("deleting", True), ("present", False), (None, False)])
def test_only_an_uninstall_removes_the_pods_rules(
        netns: str, peer_netns: str, add_stub_link, tmp_path: Path,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, state: str | None, removed: bool) -> None:
    add_stub_link(netns, f"{POD_IP}/24")
    add_stub_link(peer_netns, f"{CNI_POD_IP}/24")
    if state is not None:  # None: not deployed by the chart (lab, VM): no owner to ask
        monkeypatch.setenv(OWNER_ENV, f"{OWNER.namespace}/{OWNER.name}")
    else:
        monkeypatch.delenv(OWNER_ENV, raising=False)
    assert asyncio.run(_enrol_then_stop(netns, peer_netns, tmp_path, state)) is removed
    assert _trellis_rules(netns) is not removed
    assert _trellis_rules(peer_netns) is not removed
