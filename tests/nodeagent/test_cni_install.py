"""Keeping trellis-cni chained into a node's CNI configuration: pure JSON edits, atomic
files, a watcher that puts the entry back, and clean-up on a real uninstall only."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cni_support import OWNER, ApiServer, kubeconfig

from nodeagent.cni.install import (
    InstallSettings,
    chain,
    install,
    is_chained,
    keep_installed,
    primary_config,
    remove,
    unchain,
)
from nodeagent.cni.lifecycle import Presence, presence_of
from tunnel import tasks

FLANNEL = {"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}
BRIDGE_CONF = {"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}
ENTRY = {"agentSocket": "/var/run/trellis/cni.sock", "timeoutSeconds": 30,
         "excludeNamespaces": ["kube-system", "trellis-system"]}
BOUND_S = 3.0  # how long the watcher may take to notice and repair (it checks every 0.05 s)


@pytest.mark.unit
def test_chain_appends_once_and_is_idempotent() -> None:
    once = chain(FLANNEL, ENTRY)
    assert [p["type"] for p in once["plugins"]] == ["flannel", "portmap", "trellis-cni"]
    assert chain(once, ENTRY) == once
    assert is_chained(once, ENTRY) and not is_chained(FLANNEL, ENTRY)
    assert not is_chained(once, {**ENTRY, "timeoutSeconds": 5})  # a stale entry is rewritten
    assert unchain(once) == FLANNEL


@pytest.mark.unit
def test_chain_turns_a_single_plugin_conf_into_a_list() -> None:
    out = chain(BRIDGE_CONF, ENTRY)
    assert out["cniVersion"] == "0.4.0"
    assert out["plugins"][0] == {"type": "bridge", "bridge": "cni0"}


@pytest.mark.unit
def test_chain_refuses_a_list_with_nothing_to_follow() -> None:
    with pytest.raises(ValueError, match="plugins"):
        chain({"cniVersion": "1.0.0", "name": "x", "plugins": []}, ENTRY)


def _dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    binary = tmp_path / "trellis-cni"
    binary.write_bytes(b"\x7fELF stand-in")
    return conf, bins, binary


@pytest.mark.unit
def test_install_and_remove_on_disk(tmp_path: Path) -> None:
    conf, bins, binary = _dirs(tmp_path)
    (conf / "10-flannel.conflist").write_text(json.dumps(FLANNEL))
    (conf / "99-other.conf").write_text("{}")
    assert primary_config(conf) == conf / "10-flannel.conflist"
    install(binary, bins, conf, ENTRY)
    assert (bins / "trellis-cni").stat().st_mode & 0o111
    chained = json.loads((conf / "10-flannel.conflist").read_text())
    assert chained["plugins"][-1] == {**ENTRY, "type": "trellis-cni"}
    fallback = tmp_path / "cni.sock.fallback"
    fallback.write_text("trellis-cni-fallback 1\n")
    remove(bins, conf, (fallback,))
    assert json.loads((conf / "10-flannel.conflist").read_text()) == FLANNEL
    assert not (bins / "trellis-cni").exists() and not fallback.exists()
    assert json.loads((conf / "99-other.conf").read_text()) == {}  # not ours: untouched


# -- the running installer ------------------------------------------------------------------

async def _until(check: Callable[[], bool], what: str, bound_s: float = BOUND_S) -> float:
    """Poll ``check`` until true; fail naming ``what`` after ``bound_s``. Returns the wait."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > bound_s:
            raise AssertionError(f"not within {bound_s} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def _chained(path: Path) -> bool:
    try:
        return is_chained(json.loads(path.read_text()), ENTRY)
    except (OSError, ValueError):
        return False


class _Running:
    def __init__(self, settings: InstallSettings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Running:
        self.task = tasks.spawn(keep_installed(self.settings, self.stop), name="installer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 15)


def _settings(tmp_path: Path, **extra: Any) -> InstallSettings:
    conf, bins, binary = _dirs(tmp_path)
    return InstallSettings(binary=binary, bin_dir=bins, conf_dir=conf, entry=ENTRY,
                           ready_file=tmp_path / "ready", interval_s=0.05,
                           fallback_file=tmp_path / "cni.sock.fallback", **extra)


@pytest.mark.inprocess
def test_a_rewritten_config_is_chained_again_and_readiness_follows(tmp_path: Path) -> None:
    asyncio.run(_rewritten_config(tmp_path))


async def _rewritten_config(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    conflist = s.conf_dir / "10-flannel.conflist"
    async with _Running(s):
        # Positive control first: with no config there is nothing to chain into.
        await _until(lambda: not s.ready_file.exists(), "not ready without a config")  # type: ignore[union-attr]
        conflist.write_text(json.dumps(FLANNEL))
        await _until(lambda: _chained(conflist), "chained into the new config")
        await _until(s.ready_file.exists, "ready once chained")  # type: ignore[union-attr]
        assert (s.bin_dir / "trellis-cni").read_bytes() == s.binary.read_bytes()
        # The cluster's CNI restarts and writes its config again, without us.
        conflist.write_text(json.dumps(FLANNEL))
        waited = await _until(lambda: _chained(conflist), "re-chained after a rewrite")
        assert waited < 1.0
        # Half-written, then gone: not ready meanwhile; back when a config returns.
        conflist.write_text('{"cniVersion": "1.0.0", "plugins": [')
        await _until(lambda: not s.ready_file.exists(), "not ready on a broken config")  # type: ignore[union-attr]
        conflist.unlink()
        await asyncio.sleep(0.2)
        assert not s.ready_file.exists()  # type: ignore[union-attr]
        conflist.write_text(json.dumps(FLANNEL))
        await _until(lambda: _chained(conflist) and s.ready_file.exists(),  # type: ignore[union-attr]
                     "chained and ready again")
        # Someone deletes the binary: put back too.
        (s.bin_dir / "trellis-cni").unlink()
        await _until((s.bin_dir / "trellis-cni").exists, "binary restored")


@pytest.mark.inprocess
def test_a_conf_written_by_the_cluster_cni_becomes_a_chained_conflist(tmp_path: Path) -> None:
    asyncio.run(_conf_converted(tmp_path))


async def _conf_converted(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    (s.conf_dir / "20-later.conflist").write_text(json.dumps(FLANNEL))
    async with _Running(s):
        await _until(lambda: _chained(s.conf_dir / "20-later.conflist"), "chained")
        # A .conf that sorts first takes over: it is what the kubelet uses now.
        (s.conf_dir / "10-bridge.conf").write_text(json.dumps(BRIDGE_CONF))
        converted = s.conf_dir / "10-bridge.conflist"
        await _until(lambda: _chained(converted), ".conf converted and chained")
        assert not (s.conf_dir / "10-bridge.conf").exists()
        plugins = json.loads(converted.read_text())["plugins"]
        assert [p["type"] for p in plugins] == ["bridge", "trellis-cni"]
        assert primary_config(s.conf_dir) == converted


# -- stop: upgrade or uninstall ------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize(("status", "body", "presence"), [
    (200, {"kind": "DaemonSet", "metadata": {"name": "trellis-agent"}}, Presence.PRESENT),
    (200, {"metadata": {"deletionTimestamp": "2026-12-08T00:00:00Z"}}, Presence.DELETING),
    (404, {"kind": "Status", "reason": "NotFound",
           "details": {"name": "trellis-agent", "kind": "daemonsets"}}, Presence.GONE),
    # A 404 that does not name our DaemonSet (an unserved path) proves nothing.
    (404, {"kind": "Status", "reason": "NotFound"}, Presence.UNKNOWN),
    (404, None, Presence.UNKNOWN),
    (403, {"kind": "Status", "reason": "Forbidden"}, Presence.UNKNOWN),
    (500, {}, Presence.UNKNOWN),
])
def test_presence_of(status: int, body: object, presence: Presence) -> None:
    assert presence_of(status, body, OWNER) is presence


@pytest.mark.inprocess
@pytest.mark.parametrize(("state", "uninstalls"), [
    ("present", False), ("gone", True), ("deleting", True), ("unreachable", False)])
def test_stop_removes_everything_only_on_a_real_uninstall(
        tmp_path: Path, state: str, uninstalls: bool) -> None:
    asyncio.run(_stop(tmp_path, state, uninstalls))


async def _stop(tmp_path: Path, state: str, uninstalls: bool) -> None:
    apiserver = ApiServer()
    await apiserver.start()
    try:
        await _stop_with(tmp_path, apiserver, state, uninstalls)
    finally:
        await apiserver.stop()


async def _stop_with(tmp_path: Path, apiserver: ApiServer, state: str,
                     uninstalls: bool) -> None:
    url = "http://127.0.0.1:9" if state == "unreachable" else apiserver.url
    s = _settings(tmp_path, owner=OWNER,
                  kubeconfig=kubeconfig(tmp_path / "kubeconfig", url))
    conflist = s.conf_dir / "10-flannel.conflist"
    conflist.write_text(json.dumps(FLANNEL))
    s.fallback_file.write_text("trellis-cni-fallback 1\n")  # type: ignore[union-attr]
    apiserver.state = state
    async with _Running(s):
        await _until(lambda: _chained(conflist), "chained")
    assert apiserver.gets == (0 if state == "unreachable" else 1)
    assert _chained(conflist) is not uninstalls
    assert (s.bin_dir / "trellis-cni").exists() is not uninstalls
    assert s.fallback_file.exists() is not uninstalls  # type: ignore[union-attr]
    if uninstalls:
        assert json.loads(conflist.read_text()) == FLANNEL
    assert not s.ready_file.exists()  # type: ignore[union-attr]


@pytest.mark.inprocess
def test_the_command_runs_until_sigterm_and_remove_undoes_it(tmp_path: Path) -> None:
    """`trellis cni install` as the chart runs it (no owner: an upgrade-style stop)."""
    conf, bins, binary = _dirs(tmp_path)
    conflist = conf / "10-flannel.conflist"
    conflist.write_text(json.dumps(FLANNEL))
    ready = tmp_path / "ready"
    trellis = Path(sys.executable).with_name("trellis")
    common = ["--bin-dir", str(bins), "--conf-dir", str(conf)]
    process = subprocess.Popen(
        [str(trellis), "cni", "install", *common, "--binary", str(binary), "--ready-file",
         str(ready), "--exclude-namespace", "kube-system", "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        asyncio.run(_until(ready.exists, "ready", bound_s=30))
        chained = json.loads(conflist.read_text())["plugins"][-1]
        assert chained["excludeNamespaces"] == ["kube-system"]
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stays chained" in err and not ready.exists()
    assert _chained_any(conflist) and (bins / "trellis-cni").exists()
    done = subprocess.run([str(trellis), "cni", "install", "--remove", *common],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(conflist.read_text()) == FLANNEL and not (bins / "trellis-cni").exists()


def _chained_any(path: Path) -> bool:
    return any(p.get("type") == "trellis-cni" for p in json.loads(path.read_text())["plugins"])
