"""Pure parts of the benchmark's moving pieces: the load generator's schedule and
framing, the peer configurations, and the command line's settings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import cli, peers, runner
from bench.certs import Leaf, PeerCerts
from bench.loadgen import latency_start, response_length, scheduled_offset
from lab.errors import LabError

pytestmark = pytest.mark.unit


def test_open_loop_schedule_is_fixed_rate() -> None:
    assert scheduled_offset(0, 1000) == 0
    assert scheduled_offset(1000, 1000) == pytest.approx(1.0)
    assert scheduled_offset(5, 500) == pytest.approx(0.01)


def test_latency_counts_from_due_only_when_the_connection_was_busy() -> None:
    # Free before it was due: the due→sent gap is our timer, not the proxy.
    assert latency_start(due=1.0, sent=1.001, free_at=0.5) == 1.001
    # Still busy with the previous response at due time: the wait is the system's.
    assert latency_start(due=1.0, sent=1.3, free_at=1.3) == 1.0


def test_response_length_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    assert response_length(head) is None
    assert response_length(head + b"ab") is None
    assert response_length(head + b"abcd") == len(head) + 4
    assert response_length(head + b"abcdHTTP/1.1") == len(head) + 4
    assert response_length(b"HTTP/1.1 204 No Content\r\n\r\n") == 27


def test_stunnel_config_requires_client_certificates(tmp_path: Path) -> None:
    text = peers.stunnel_config(client=False, services=[("t8090", 38090, "127.0.0.1:8090")],
                                cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                ca=tmp_path / "ca.pem")
    assert "[t8090]" in text and "accept = 38090" in text and "client = no" in text
    assert "verifyChain = yes" in text and "sslVersionMin = TLSv1.3" in text
    client = peers.stunnel_config(client=True, services=[("t8090", 28090, "10.0.0.1:38090")],
                                  cert=tmp_path / "c.pem", key=tmp_path / "k.pem",
                                  ca=tmp_path / "ca.pem")
    assert "accept = 127.0.0.1:28090" in client  # sidecar-style: loopback only


def test_envoy_configs_carry_both_targets_over_one_hbone_listener(tmp_path: Path) -> None:
    leaf = Leaf(tmp_path / "x.pem", tmp_path / "x-key.pem", "spiffe://cluster.local/ns/b/sa/s")
    certs = PeerCerts(tmp_path, tmp_path / "ca.pem", leaf, leaf)
    client, server = peers.envoy_configs(certs, "198.18.2.13", (5201, 8090))
    listeners = client["static_resources"]["listeners"]
    assert [lst["address"]["socket_address"]["port_value"] for lst in listeners] == [
        peers.local_port("envoy", 5201), peers.local_port("envoy", 8090)]
    hostnames = [lst["filter_chains"][0]["filters"][0]["typed_config"]["tunneling_config"]
                 ["hostname"] for lst in listeners]
    assert hostnames == ["198.18.2.13:5201", "198.18.2.13:8090"]
    assert len(client["static_resources"]["clusters"]) == 1  # one pool to the peer's 15008
    (terminate,) = server["static_resources"]["listeners"]
    assert terminate["address"]["socket_address"]["port_value"] == 15008
    hosts = (terminate["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
             ["virtual_hosts"])
    assert [(h["domains"], h["routes"][0]["route"]["cluster"]) for h in hosts] == [
        (["198.18.2.13:5201"], "app_5201"), (["198.18.2.13:8090"], "app_8090")]
    clusters = {c["name"] for c in server["static_resources"]["clusters"]}
    assert clusters == {"app_5201", "app_8090"}


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"scenarios": ",".join(runner.SCENARIOS), "quick": False,
                                 "repetitions": None, "results_dir": "/tmp/r", "keep_lab": False}
    values.update(overrides)
    return argparse.Namespace(**values)


def test_settings_defaults_and_quick() -> None:
    full = cli.settings_from(_args())
    assert full.repetitions == 3 and full.durations == runner.FULL
    assert full.scenarios == ("direct", "trellis", "trellis-ebpf", "envoy", "stunnel")
    quick = cli.settings_from(_args(quick=True, scenarios="stunnel,direct"))
    assert quick.repetitions == 1 and quick.durations == runner.QUICK
    assert quick.scenarios == ("direct", "stunnel")  # always the canonical order


def test_settings_accept_trellis_ebpf() -> None:
    settings = cli.settings_from(_args(scenarios="trellis-ebpf, trellis"))
    assert settings.scenarios == ("trellis", "trellis-ebpf")
    assert runner.MESH_SCENARIOS == {"trellis": "iptables", "trellis-ebpf": "ebpf"}
    with pytest.raises(LabError, match="--scenarios: unknown trellis-bpf"):
        cli.settings_from(_args(scenarios="trellis-bpf"))


def test_settings_errors_name_the_option() -> None:
    with pytest.raises(LabError, match="--scenarios: unknown linkerd"):
        cli.settings_from(_args(scenarios="direct,linkerd"))
    with pytest.raises(LabError, match="--repetitions"):
        cli.settings_from(_args(repetitions=0))


def test_every_load_loop_is_bounded() -> None:
    for durations in (runner.FULL, runner.QUICK):
        assert 0 < durations.bulk <= 10 and 0 < durations.rr <= 10 and 0 < durations.crr <= 10
        assert durations.hold_connections == 1000


def test_bench_pods_are_two_enrolled_and_two_plain_across_two_nodes() -> None:
    from bench.labsetup import OBJECTS
    from lab.lifecycle import read_documents
    from lab.plan import plan_lab
    from lab.spec import build_spec

    plan = plan_lab(build_spec(read_documents(str(OBJECTS)), str(OBJECTS)))
    pods = {p.name: (p.node, p.enrolled) for p in plan.pods}
    assert pods == {"mesh-client": ("node-1", True), "mesh-server": ("node-2", True),
                    "plain-client": ("node-1", False), "plain-server": ("node-2", False)}
