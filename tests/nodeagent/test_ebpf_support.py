"""Choosing eBPF mode: what the host must have, named with its fix, and the fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import ebpf_support, podcgroup, redirect_modes
from nodeagent.ebpf import pod_dirname
from nodeagent.ebpf_routing import RETURN_RULES, routing_steps
from nodeagent.ebpf_support import EbpfUnavailable, cgroup2_mount, kernel_version
from nodeagent.iptables import IptablesRedirector
from tunnel.config import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("release", "version"), [
    ("6.18.44-fc-v595", (6, 18)), ("6.1.0-56-amd64", (6, 1)), ("5.15.0", (5, 15)),
    ("6.6rc1", (6, 6)), ("garbage", (0, 0)),
])
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert kernel_version(release) == version


def test_cgroup2_mount_is_found_or_named_as_missing(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_mount(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n")
    with pytest.raises(EbpfUnavailable, match=r"no cgroup v2 .*--redirect iptables"):
        cgroup2_mount(str(mounts))


def test_an_old_kernel_is_refused_with_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    class Uname:
        release = "5.10.0-28-amd64"

    monkeypatch.setattr(ebpf_support.os, "uname", lambda: Uname)
    with pytest.raises(EbpfUnavailable, match=r"kernel 5\.10\.0-28-amd64 is older than 6\.6"):
        ebpf_support.check_support("/sys/fs/bpf/trellis/x")


def _unavailable(*_args: object, **_kwargs: object) -> None:
    raise EbpfUnavailable("no cgroup v2 hierarchy is mounted")


def test_no_ebpf_stops_the_agent_unless_a_fallback_is_configured(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import nodeagent.ebpf

    monkeypatch.setattr(nodeagent.ebpf, "EbpfRedirector", _unavailable)
    with pytest.raises(ConfigError, match=r"redirect: ebpf cannot work on this host: no cgroup"):
        redirect_modes.make_redirector("ebpf", bpf_root="/sys/fs/bpf/trellis/n")
    fallback = redirect_modes.make_redirector("ebpf", bpf_root="/sys/fs/bpf/trellis/n",
                                              fallback="iptables")
    assert isinstance(fallback, IptablesRedirector)


def test_pod_uids_become_file_names() -> None:
    assert pod_dirname("demo/frontend-1") == "demo_frontend-1"
    assert pod_dirname("0b6f-11ee.x") == "0b6f-11ee.x"


def test_return_rules_send_only_untagged_local_tcp_to_table_100() -> None:
    # Mark, probe and HBONE exceptions must come before the catch-all, and the
    # catch-all must be limited to locally sent packets (iif lo).
    priorities = [p for p, _s, _t in RETURN_RULES]
    assert priorities == sorted(priorities)
    assert RETURN_RULES[-1][1:] == ("iif lo ipproto tcp", "100")
    assert all(table == "main" for _p, _s, table in RETURN_RULES[:-1])


def test_routing_adds_the_local_route_before_rules_and_removes_it_after() -> None:
    add = routing_steps("eth0", add=True)
    remove = routing_steps("eth0", add=False)
    assert add[0] == ["sysctl", "-qw", "net.ipv4.conf.eth0.accept_local=1"]
    assert add[1][:3] == ["ip", "route", "add"]
    assert remove[-2][:3] == ["ip", "route", "del"]
    assert remove[-1][-1].endswith("accept_local=0")
    assert [s[3:] for s in add[2:]] == [s[3:] for s in remove[:-2]]


UID = "0b6f3a2c-1d2e-4f5a-8b9c-0123456789ab"


@pytest.mark.parametrize(("path", "expected"), [
    (f"/kubepods/besteffort/pod{UID}/abc123", f"/kubepods/besteffort/pod{UID}"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     ".slice/cri-containerd-abc.scope",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}"
     ".slice"),
    ("/system.slice/sshd.service", None),
])
def test_the_pod_level_cgroup_is_the_one_naming_its_uid(path: str, expected: str | None) -> None:
    assert podcgroup.pod_level(path, UID) == expected


def test_find_scans_proc_for_a_process_of_the_pod(tmp_path: Path) -> None:
    for pid, cgroup in (("1", "/init.scope"), ("42", f"/kubepods/pod{UID}/c1"), ("x", "/")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cgroup").write_text(f"1:cpu:/\n0::{cgroup}\n")
    found = podcgroup.find(UID, "/sys/fs/cgroup", str(tmp_path))
    assert found == f"/sys/fs/cgroup/kubepods/pod{UID}"
    assert podcgroup.find("ffffffff-1d2e-4f5a-8b9c-0123456789ab", "/m", str(tmp_path)) == ""
