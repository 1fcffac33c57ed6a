"""Which labs a bench run uses: the main lab for the plain scenarios and the mesh in
its own redirect mode, a side lab of the bench's own for the other mode, and which
pods the servers start in. The lab itself is replaced by a recording fake here; the
smoke test (test_bench_smoke.py) brings real ones up and down."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import labsetup, runner
from bench.labsetup import BenchLab, BenchLabs, side_lab
from lab.errors import LabError
from lab.plan import PodPlan
from lab.state import LabDir

pytestmark = pytest.mark.unit

MAIN = LabDir(Path("/run/trellis-lab-x"))


def test_side_lab_sits_beside_the_main_lab_and_outside_its_prefix() -> None:
    side_dir, prefix = side_lab(MAIN, "tlab-x-", "ebpf")
    assert side_dir == LabDir(Path("/run/trellis-lab-x-ebpf"))
    assert prefix == "tlab-ebpf-x-"
    # `lab down` of the main lab sweeps namespaces by its prefix: not the side lab's.
    assert not prefix.startswith("tlab-x-")
    assert side_lab(LabDir(Path("/run/trellis-lab")), "tlab-", "iptables") == (
        LabDir(Path("/run/trellis-lab-iptables")), "tlab-iptables-")


def _pod(name: str, netns: str) -> PodPlan:
    return PodPlan(name, "bench", "node-1", netns, "198.18.1.10", name, {},
                   name.startswith("mesh"))


def _fake_lab(root: str, mode: str) -> BenchLab:
    return BenchLab(LabDir(Path(root)), True, mode, _pod("mesh-client", f"{root}-mc"),
                    _pod("mesh-server", f"{root}-ms"), _pod("plain-client", f"{root}-pc"),
                    _pod("plain-server", f"{root}-ps"), (1, 2),
                    {"bench/mesh-client": f"/cg/{root}/mc"})


class FakeLabs:
    """Stands in for the lab: records each lab entered and left, in order; ``existing``
    are the labs already up (directory → their redirect mode)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.existing: dict[str, str] = {}

    @contextlib.contextmanager
    def lab(self, labdir: LabDir, out: object, keep: bool, mode: str, side: bool,
            prefix: str | None = None) -> Iterator[BenchLab]:
        # A lab that is already up keeps its mode; one the bench brings up gets ``mode``.
        mode = self.existing.get(str(labdir.root), mode)
        self.events.append(("enter", str(labdir.root), mode, str(prefix)))
        yield _fake_lab(str(labdir.root), mode)
        self.events.append(("leave", str(labdir.root)))

    def record(self, labdir: LabDir) -> SimpleNamespace | None:
        if str(labdir.root) not in self.existing:
            return None
        return SimpleNamespace(mesh=True, plan=SimpleNamespace(prefix="tlab-x-"))

    def run(self, modes: list[str]) -> BenchLabs:
        with labsetup.bench_labs(MAIN, modes, lambda line: None, keep=False) as labs:
            return labs


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeLabs:
    fake = FakeLabs()
    monkeypatch.setattr(labsetup, "_lab", fake.lab)
    monkeypatch.setattr(labsetup, "load_record", fake.record)
    monkeypatch.setattr(labsetup, "netns_prefix", lambda: "tlab-x-")
    return fake


def test_both_modes_with_no_lab_up_bring_up_an_iptables_main_and_an_ebpf_side(
        fake: FakeLabs) -> None:
    labs = fake.run(["iptables", "ebpf"])
    assert labs.main.redirect == "iptables"
    assert {m: lab.labdir.root.name for m, lab in labs.meshes.items()} == {
        "iptables": "trellis-lab-x", "ebpf": "trellis-lab-x-ebpf"}
    assert fake.events == [
        ("enter", "/run/trellis-lab-x", "iptables", "None"),
        ("enter", "/run/trellis-lab-x-ebpf", "ebpf", "tlab-ebpf-x-"),
        ("leave", "/run/trellis-lab-x-ebpf"),  # the side lab goes down first
        ("leave", "/run/trellis-lab-x")]


def test_an_ebpf_main_lab_gets_an_iptables_side_lab(fake: FakeLabs) -> None:
    fake.existing["/run/trellis-lab-x"] = "ebpf"
    labs = fake.run(["iptables", "ebpf"])
    assert labs.meshes["ebpf"] is labs.main
    assert labs.meshes["iptables"].labdir.root.name == "trellis-lab-x-iptables"
    assert ("enter", "/run/trellis-lab-x-iptables", "iptables", "tlab-iptables-x-") in fake.events


def test_ebpf_alone_needs_no_second_lab(fake: FakeLabs) -> None:
    labs = fake.run(["ebpf"])
    assert labs.main.redirect == "ebpf" and list(labs.meshes) == ["ebpf"]
    assert [e for e in fake.events if e[0] == "enter"] == [
        ("enter", "/run/trellis-lab-x", "ebpf", "None")]


def test_plain_scenarios_alone_use_the_main_lab_only(fake: FakeLabs) -> None:
    labs = fake.run([])
    assert labs.main.redirect == "iptables" and list(labs.meshes) == ["iptables"]


def test_servers_start_once_per_pod_in_each_scenarios_lab() -> None:
    main, side = _fake_lab("main", "iptables"), _fake_lab("side", "ebpf")
    labs = BenchLabs(main, {"iptables": main, "ebpf": side})
    pods = runner.server_pods(runner.SCENARIOS, labs)
    assert [(lab.labdir.root.name, pod.netns) for lab, pod in pods] == [
        ("main", "main-ps"), ("main", "main-ms"), ("side", "side-ms")]
    assert [p.netns for _, p in runner.server_pods(("trellis-ebpf",), labs)] == ["side-ms"]
    assert side.cgroup(side.mesh_client) == "/cg/side/mc"  # the client joins it
    assert side.cgroup(side.plain_client) == ""


def test_a_main_lab_without_the_mesh_is_refused_before_any_lab_is_entered(
        fake: FakeLabs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labsetup, "load_record", lambda labdir: SimpleNamespace(
        mesh=False, plan=SimpleNamespace(prefix="tlab-x-")))
    with pytest.raises(LabError, match="without the mesh"):
        fake.run(["iptables"])
    assert fake.events == []
