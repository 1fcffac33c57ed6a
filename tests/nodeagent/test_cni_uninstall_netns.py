"""The agent's last step on SIGTERM: keep every pod's rules on an upgrade, remove them
on an uninstall (issue 17, defect 6). Real iptables in a fresh namespace, the real
reconciler, a stand-in API server answering for the chart's DaemonSet."""

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
from nodeagent.iptables import IptablesRedirector

pytestmark = pytest.mark.netns

POD_IP = "198.18.211.7"


def _trellis_rules(ns: str) -> bool:
    save = subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True,
                          text=True, check=True).stdout
    return "TRELLIS" in save


async def _enrol_then_stop(ns: str, tmp_path: Path, state: str | None) -> bool:
    server = ApiServer()
    await server.start()
    try:
        server.state = state or "present"
        reconciler = Reconciler("node-1", FakeProxy(), IptablesRedirector())  # type: ignore[arg-type]
        await reconciler.apply_snapshot(snapshot(pod(ns, POD_IP)))
        assert reconciler.served_count == 1 and _trellis_rules(ns)  # positive control
        return await stop_redirection(reconciler, kubeconfig(tmp_path / "kc", server.url))
    finally:
        await server.stop()


@pytest.mark.parametrize(("state", "removed"), [
    ("gone", True), ("deleting", True), ("present", False), (None, False)])
def test_only_an_uninstall_removes_the_pods_rules(
        netns: str, add_stub_link, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
        state: str | None, removed: bool) -> None:
    add_stub_link(netns, f"{POD_IP}/24")
    if state is not None:  # None: not deployed by the chart (lab, VM): no owner to ask
        monkeypatch.setenv(OWNER_ENV, f"{OWNER.namespace}/{OWNER.name}")
    else:
        monkeypatch.delenv(OWNER_ENV, raising=False)
    assert asyncio.run(_enrol_then_stop(netns, tmp_path, state)) is removed
    assert _trellis_rules(netns) is not removed
