"""The node's kubelet-probe SNAT rules as text, compared with golden files
(TRELLIS_UPDATE_GOLDEN=1 rewrites them). ``host_applied.save`` is real
``iptables-save -t nat`` output of a namespace after one apply, with another
tool's masquerade rule in POSTROUTING."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nodeagent.host_probe import render_host_removal, render_host_rules

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
PODS = ("198.18.1.12", "198.18.1.11", "198.18.1.12")  # unsorted, one twice


def _save(name: str) -> str:
    return (GOLDEN / name).read_text()


CASES: dict[str, Callable[[], str]] = {
    "host_fresh.golden": lambda: render_host_rules(PODS),
    "host_again.golden": lambda: render_host_rules(PODS, _save("host_applied.save")),
    "host_removal.golden": lambda: render_host_removal(_save("host_applied.save")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden_file(name: str) -> None:
    text = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("TRELLIS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with TRELLIS_UPDATE_GOLDEN=1 if meant"


def test_rules_are_in_the_form_iptables_save_prints_them() -> None:
    rendered = {line for line in render_host_rules(PODS).splitlines() if line.startswith("-A ")}
    saved = {line for line in _save("host_applied.save").splitlines()
             if line.startswith("-A TRELLIS_")}
    assert rendered == saved


def test_only_locally_sent_tcp_to_the_listed_pods_is_rewritten() -> None:
    rules = [line for line in render_host_rules(PODS).splitlines() if line.startswith("-A ")]
    assert len(rules) == 2  # one per distinct pod
    for rule in rules:
        assert "-m owner --socket-exists" in rule  # forwarded traffic has no local socket
        assert " -p tcp " in rule and "-j SNAT --to-source 169.254.7.127" in rule


def test_removal_keeps_other_rules_and_nothing_to_remove_renders_nothing() -> None:
    removal = render_host_removal(_save("host_applied.save"))
    assert "MASQUERADE" not in removal
    assert "-D POSTROUTING -j TRELLIS_HOST_POSTRT" in removal
    assert render_host_removal("") == ""
    assert render_host_removal("*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n") == ""


def test_a_bad_address_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        render_host_rules(["10.0.0.300"])


def test_the_agent_setting_must_be_an_absolute_path_or_empty(tmp_path: Path) -> None:
    from nodeagent.config import AgentConfig
    from tunnel.config import ConfigError, ProxyConfig

    workloads = tmp_path / "w.yaml"
    workloads.write_text("")
    base = {"proxy": ProxyConfig(node="node-1"), "workloads_file": workloads,
            "control_socket": tmp_path / "proxy.sock"}
    assert AgentConfig(**base).host_netns == "/proc/self/ns/net"  # the agent's own
    assert AgentConfig(**base, host_netns="").host_netns == ""  # none at all
    with pytest.raises(ConfigError, match=r"host_netns: 'proc/1/ns/net' is not an absolute"):
        AgentConfig(**base, host_netns="proc/1/ns/net")
