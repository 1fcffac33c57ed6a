"""Limits and refusals, pure parts: the settings, the target checks, admission,
the idle sweep's decisions and the rate-limited log (issue 10)."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tunnel.config import ConfigError, ProxyConfig
from tunnel.limits import ConnectionLimits, IdleSweeper, fds_needed
from tunnel.lograte import RateLimitedLog
from tunnel.metrics import ProxyMetrics
from tunnel.refusals import Refusal, inbound_refusal, outbound_refusal
from tunnel.served import LiveConnection, ServedPod
from tunnel.state import Workload

POD_IP = "10.1.0.5"
OWN = ProxyConfig(node="n").own_ports


def _pod(name: str = "web") -> ServedPod:
    workload = Workload(uid=f"uid-{name}", name=name, namespace="demo", node="n", ip=POD_IP,
                        service_account="web", labels={}, enrolled=True)
    return ServedPod(workload, netns=None)  # type: ignore[arg-type]  # never opened here


@pytest.mark.unit
@pytest.mark.parametrize(("setting", "value", "message"), [
    ("max_connections_per_node", 0, "max_connections_per_node: must be within 1..1000000"),
    ("max_connections_per_pod", 70000, "max_connections_per_pod: must be within 1..max_"),
    ("relay_idle_timeout_s", -1.0, "relay_idle_timeout_s: must be 0 (off)"),
    ("relay_idle_timeout_s", float("inf"), "relay_idle_timeout_s: must be 0 (off)"),
    ("relay_write_high_water_bytes", 1024, "relay_write_high_water_bytes: must be within"),
    ("admin_ports", (15020, 70000), "admin_ports: 70000 is not a TCP port"),
])
def test_bad_limits_are_refused_naming_the_setting(setting: str, value: object,
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProxyConfig(node="n", **{setting: value})  # type: ignore[arg-type]


@pytest.mark.unit
def test_defaults_admit_the_soak_and_name_every_own_port() -> None:
    config = ProxyConfig(node="n")
    assert config.max_connections_per_pod >= 10_000
    assert config.max_connections_per_node >= 2 * 10_000
    assert config.own_ports == {15001, 15006, 15008, 15020, 15021}
    assert ProxyConfig(node="n", admin_ports=(9090,)).own_ports == {15001, 15006, 15008, 9090}
    assert fds_needed(config) > 2 * config.max_connections_per_node
    assert config.as_dict()["own_ports"] == [15001, 15006, 15008, 15020, 15021]


@pytest.mark.unit
@pytest.mark.parametrize(("dst", "expected"), [
    (("127.0.0.1", 15001), Refusal.LOOPBACK),
    (("127.0.0.2", 8080), Refusal.LOOPBACK),
    (("0.0.0.0", 15001), Refusal.LOOPBACK),
    ((POD_IP, 15001), Refusal.OWN_POD),
    ((POD_IP, 8080), Refusal.OWN_POD),
    (("10.1.0.6", 15001), None),   # another pod: its own proxy refuses what it must
    (("10.1.0.6", 8080), None),
])
def test_outbound_targets(dst: tuple[str, int], expected: Refusal | None) -> None:
    assert outbound_refusal(dst, POD_IP) is expected


@pytest.mark.unit
@pytest.mark.parametrize(("target", "expected"), [
    *(((POD_IP, port), Refusal.OWN_PORT) for port in (15001, 15006, 15008, 15020, 15021)),
    (("10.9.9.9", 8080), Refusal.NOT_THIS_POD),
    (("127.0.0.1", 8080), Refusal.NOT_THIS_POD),
    ((POD_IP, 8080), None),
    ((POD_IP, 15007), None),
])
def test_inbound_targets(target: tuple[str, int], expected: Refusal | None) -> None:
    assert inbound_refusal(target, POD_IP, OWN) is expected


@pytest.mark.unit
def test_admission_counts_per_pod_and_node_and_releases() -> None:
    config = ProxyConfig(node="n", max_connections_per_node=3, max_connections_per_pod=2)
    pods = [_pod("a"), _pod("b")]
    metrics = ProxyMetrics()
    limits = ConnectionLimits(config, metrics, lambda: pods)
    a, b = pods
    assert limits.admit(a) is None and limits.admit(a) is None
    assert limits.admit(a) is Refusal.POD_LIMIT
    assert limits.admit(b) is None
    assert limits.admit(b) is Refusal.NODE_LIMIT
    assert (limits.active, a.active, b.active) == (3, 2, 1)
    assert metrics.registry.get_sample_value("trellis_connections_active",
                                             {"scope": "busiest_pod"}) == 2
    limits.release(a)
    assert limits.admit(b) is None  # the room a released goes to whoever asks next
    assert metrics.registry.get_sample_value("trellis_connections_active",
                                             {"scope": "node"}) == 3


@dataclass
class _Handle:
    a_to_b: int = 0
    b_to_a: int = 0
    done: bool = False
    closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed, self.done = reason, True


@pytest.mark.unit
def test_idle_sweep_closes_only_what_moved_nothing_for_the_timeout() -> None:
    pod = _pod()
    quiet, busy = (LiveConnection("inbound", None, POD_IP, None, 80,  # type: ignore[arg-type]
                                  started=100.0, active_at=100.0) for _ in range(2))
    quiet.handle, busy.handle = _Handle(), _Handle()  # type: ignore[assignment]
    pod.connections.update((quiet, busy))
    metrics = ProxyMetrics()
    sweeper = IdleSweeper(10.0, metrics, lambda: [pod])
    assert sweeper.interval_s == 1.25
    busy.handle.b_to_a = 5  # type: ignore[union-attr]
    assert sweeper.sweep(105.0) == 0
    busy.handle.a_to_b = 7  # type: ignore[union-attr]
    assert sweeper.sweep(109.9) == 0
    assert sweeper.sweep(110.0) == 1
    assert quiet.handle.closed == "idle timeout"  # type: ignore[union-attr]
    assert busy.handle.closed is None  # type: ignore[union-attr]
    assert metrics.registry.get_sample_value("trellis_connections_idle_closed_total",
                                             {"direction": "inbound"}) == 1
    assert sweeper.sweep(200.0) == 1  # busy, quiet since 109.9, now goes too


@pytest.mark.unit
def test_rate_limited_log_keeps_one_line_per_key_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("tunnel.lograte.time.monotonic", lambda: clock[0])
    log = RateLimitedLog(logging.getLogger("test.lograte"), interval_s=10.0)
    with caplog.at_level(logging.INFO, logger="test.lograte"):
        results = [log.log(logging.WARNING, "k", "refused", {"n": i}) for i in range(100)]
        assert log.log(logging.WARNING, "other", "refused", {})  # keys are separate
        clock[0] += 10.0
        assert log.log(logging.WARNING, "k", "refused", {"n": 100})
    assert results.count(True) == 1
    lines: list[Any] = [r for r in caplog.records if r.name == "test.lograte"]
    assert len(lines) == 3
    assert lines[2].fields == {"n": 100, "suppressed_since_last": 99}


_RAISE = textwrap.dedent("""
    import resource, sys
    from tunnel.limits import raise_fd_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
    before, after = raise_fd_limit(int(sys.argv[3]))
    print(*before, *after)
""")


def _raise_in_child(soft: int, hard: int, needed: int) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _RAISE, str(soft), str(hard), str(needed)],
                          capture_output=True, text=True, check=True, timeout=30)
    return [int(v) for v in done.stdout.split()]


@pytest.mark.unit
def test_fd_limit_soft_goes_to_hard_when_the_node_limit_needs_more() -> None:
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    assert _raise_in_child(1024, hard, hard - 100) == [1024, hard, hard, hard]
    assert _raise_in_child(1024, hard, 512) == [1024, hard, 1024, hard]  # enough: unchanged


def _may_raise_hard_limit() -> bool:
    cap_sys_resource = 24
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap_sys_resource & 1)
    return False


@pytest.mark.unit
def test_fd_limit_hard_is_raised_too_where_allowed() -> None:
    # Root with CAP_SYS_RESOURCE (CI) lifts the hard limit too; without it (some
    # containers) the soft limit still goes as high as the hard one allows.
    expected = 50_000 if _may_raise_hard_limit() else 4096
    assert _raise_in_child(1024, 4096, 50_000) == [1024, 4096, expected, expected]
