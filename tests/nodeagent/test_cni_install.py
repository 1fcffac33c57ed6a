"""Chaining trellis-cni into a node's CNI configuration: pure JSON edits, atomic files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nodeagent.cni.install import chain, install, main, primary_config, remove, unchain

pytestmark = pytest.mark.unit

FLANNEL = {"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}
ENTRY = {"agentSocket": "/var/run/trellis/cni.sock", "timeoutSeconds": 30}


def test_chain_appends_once_and_is_idempotent() -> None:
    once = chain(FLANNEL, ENTRY)
    assert [p["type"] for p in once["plugins"]] == ["flannel", "portmap", "trellis-cni"]
    assert chain(once, ENTRY) == once
    assert unchain(once) == FLANNEL


def test_chain_turns_a_single_plugin_conf_into_a_list() -> None:
    conf = {"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}
    out = chain(conf, ENTRY)
    assert out["cniVersion"] == "0.4.0"
    assert out["plugins"][0] == {"type": "bridge", "bridge": "cni0"}


def test_chain_refuses_a_list_with_nothing_to_follow() -> None:
    with pytest.raises(ValueError, match="plugins"):
        chain({"cniVersion": "1.0.0", "name": "x", "plugins": []}, ENTRY)


def test_install_and_remove_on_disk(tmp_path: Path) -> None:
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    (conf / "10-flannel.conflist").write_text(json.dumps(FLANNEL))
    (conf / "99-other.conf").write_text("{}")
    binary = tmp_path / "trellis-cni"
    binary.write_bytes(b"#!/usr/bin/env python3\n")
    assert primary_config(conf) == conf / "10-flannel.conflist"
    install(binary, bins, conf, ENTRY)
    assert (bins / "trellis-cni").stat().st_mode & 0o111
    chained = json.loads((conf / "10-flannel.conflist").read_text())
    assert chained["plugins"][-1] == {**ENTRY, "type": "trellis-cni"}
    remove(bins, conf)
    assert json.loads((conf / "10-flannel.conflist").read_text()) == FLANNEL
    assert not (bins / "trellis-cni").exists()


def test_install_without_a_cluster_cni_is_one_clear_error(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bin").mkdir()
    (tmp_path / "net.d").mkdir()
    binary = tmp_path / "trellis-cni"
    binary.write_bytes(b"x")
    code = main(["--binary", str(binary), "--bin-dir", str(tmp_path / "bin"),
                 "--conf-dir", str(tmp_path / "net.d")])
    assert code == 1
    assert "no CNI configuration yet" in capsys.readouterr().err


def test_the_zipapp_runs_on_a_bare_system_python(tmp_path: Path) -> None:
    """What the DaemonSet copies to the host: it must need nothing but the stdlib."""
    out = tmp_path / "trellis-cni"
    assert main(["--build-zipapp", str(out)]) == 0
    done = subprocess.run(["/usr/bin/python3", "-I", "-S", str(out)],
                          input='{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["supportedVersions"][-1] == "1.0.0"
