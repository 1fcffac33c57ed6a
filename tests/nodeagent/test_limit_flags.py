"""The proxy's limits as flags of `trellis proxy run` / `trellis agent run` (issue 10):
the same names as the settings, into the one frozen ProxyConfig, and a bad value
refused in one line that names it, before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import nodeagent.proxy_run
import nodeagent.run
from nodeagent import cli
from nodeagent.config import AgentConfig

pytestmark = pytest.mark.unit


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _files(tmp_path: Path) -> list[str]:
    for name in ("root.pem", "token", "workloads.yaml"):
        (tmp_path / name).write_text("x")
    return ["--node", "node-1", "--workloads", str(tmp_path / "workloads.yaml"),
            "--ca-url", "https://198.18.0.1:15012", "--ca-root", str(tmp_path / "root.pem"),
            "--token-file", str(tmp_path / "token")]


@pytest.mark.parametrize("command", [["proxy", "run", "--control-socket", "/run/t.sock"],
                                     ["agent", "run"]])
def test_limit_flags_reach_the_proxy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            command: list[str]) -> None:
    seen: list[AgentConfig] = []

    async def capture(config: AgentConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(nodeagent.proxy_run, "run_proxy", capture)
    monkeypatch.setattr(nodeagent.run, "run_agent", capture)
    args = _parser().parse_args([
        *command, *_files(tmp_path), "--max-connections-per-node", "20000",
        "--max-connections-per-pod", "12000", "--relay-idle-timeout-s", "90",
        "--relay-write-high-water-bytes", "262144", "--metrics", "127.0.0.1:9020"])
    assert args.func(args) == 0
    (config,) = seen
    proxy = config.proxy
    assert (proxy.max_connections_per_node, proxy.max_connections_per_pod,
            proxy.relay_idle_timeout_s, proxy.relay_write_high_water_bytes) == (
        20000, 12000, 90.0, 262144)
    # The metrics and readiness ports are the proxy's own too: never a target.
    assert proxy.own_ports == {15001, 15006, 15008, 9020, 15021}
    assert config.as_log_fields()["proxy"]["max_connections_per_pod"] == 12000  # type: ignore[index]


def test_defaults_are_the_settings_defaults(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[AgentConfig] = []

    async def capture(config: AgentConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(nodeagent.proxy_run, "run_proxy", capture)
    args = _parser().parse_args(["proxy", "run", "--control-socket", "/run/t.sock",
                                 *_files(tmp_path)])
    assert args.func(args) == 0
    assert seen[0].proxy == type(seen[0].proxy)(node="node-1")


def test_a_bad_limit_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[AgentConfig] = []

    async def capture(config: AgentConfig) -> None:
        started.append(config)

    monkeypatch.setattr(nodeagent.proxy_run, "run_proxy", capture)
    args = _parser().parse_args(["proxy", "run", "--control-socket", "/run/t.sock",
                                 *_files(tmp_path), "--max-connections-per-pod", "0"])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("trellis: error: max_connections_per_pod: must be within 1..")
    assert "\n" not in err and not started
