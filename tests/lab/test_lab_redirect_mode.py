"""The lab's redirection mode: kept in the lab directory, and what eBPF mode adds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import redirect_mode
from lab.errors import LabError
from lab.state import LabDir

pytestmark = pytest.mark.unit


def test_mode_defaults_to_iptables_and_is_kept(tmp_path: Path) -> None:
    labdir = LabDir(tmp_path / "lab")
    assert redirect_mode.read_mode(labdir) == "iptables"
    assert redirect_mode.choose_mode(labdir, "ebpf", lab_is_up=False) == "ebpf"
    assert redirect_mode.choose_mode(labdir, None, lab_is_up=True) == "ebpf"


def test_switching_mode_of_a_running_lab_says_to_take_it_down(tmp_path: Path) -> None:
    labdir = LabDir(tmp_path)
    redirect_mode.choose_mode(labdir, "ebpf", lab_is_up=False)
    with pytest.raises(LabError, match=r"up in ebpf mode; run `trellis lab down`"):
        redirect_mode.choose_mode(labdir, "iptables", lab_is_up=True)


def test_in_cgroup_wraps_only_when_a_cgroup_is_given(tmp_path: Path) -> None:
    assert redirect_mode.in_cgroup("", ["ip", "a"]) == ("ip", "a")
    cgroup = tmp_path / "pod"
    argv = redirect_mode.in_cgroup(str(cgroup), ["ip", "a"])
    assert argv[:2] == ("sh", "-c") and argv[3:] == (str(cgroup), "ip", "a")
    assert cgroup.is_dir()


def test_each_lab_pins_under_its_own_directory() -> None:
    assert redirect_mode.bpf_root("tlab-", "node-1") == "/sys/fs/bpf/trellis/tlab/node-1"
    assert redirect_mode.bpf_root("tlab-e2e-", "node-2") == "/sys/fs/bpf/trellis/tlab-e2e/node-2"
