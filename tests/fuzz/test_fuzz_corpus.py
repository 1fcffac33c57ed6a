"""Every fuzz target: it follows the convention, its corpus replays clean, and a
short atheris run finds nothing (``make fuzz`` runs them for longer).

The harness itself is tested on toy targets, so that a crash cannot go unseen:
a deliberately broken target must be reported with its input saved and
replayable, a fatal signal in one target must not stop the next, and a target
that raises only its own errors must come out clean.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _logging_enabled_afterwards() -> Iterator[None]:
    """harness.main() turns logging off for its process (refusal logs are not its
    output); called in process here, it must not silence every later test's logs."""
    yield
    logging.disable(logging.NOTSET)

TARGETS = harness.discover()
# A few seconds per target keeps all of them under a minute in `make test`.
SECONDS = float(os.environ.get("TRELLIS_FUZZ_SECONDS", "2"))
PROJECT_PACKAGES = ("identity.", "policy.", "tunnel.", "nodeagent.", "waypoint.")

TOY_BROKEN = '''
ALLOWED = (LookupError,)

def one_input(data: bytes) -> None:
    if data[:1] == b"k":
        raise KeyError("allowed: this toy's own error")
    if data[:4] == b"boom":
        raise ZeroDivisionError("the toy's bug")
'''
TOY_ABORTS = '''
import os

ALLOWED = ()

def one_input(data: bytes) -> None:
    if data[:4] == b"dead":
        os.abort()
'''
TOY_CLEAN = '''
ALLOWED = (ValueError,)

def one_input(data: bytes) -> None:
    if data[:1] == b"v":
        raise ValueError("allowed")
'''


def _toy(directory: Path, name: str, source: str, seeds: tuple[bytes, ...] = (b"bo",)
         ) -> harness.Target:
    (directory / f"fuzz_{name}.py").write_text(source)
    corpus = directory / "corpus" / name
    corpus.mkdir(parents=True)
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    return next(t for t in harness.discover(directory) if t.name == name)


def _crash_texts(crashes: list[Path]) -> str:
    return "\n".join(p.with_suffix(".txt").read_text() if p.with_suffix(".txt").exists()
                     else f"{p} (libFuzzer artifact)" for p in crashes)


def test_every_fuzz_target_is_found() -> None:
    assert {"control", "cni_protocol", "cni_spec", "k8s_watch", "k8s_objects", "ca_http1",
            "ca_csr", "ca_client"} <= {t.name for t in TARGETS}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_target_follows_the_convention(target: harness.Target) -> None:
    module = target.load()
    for error in module.ALLOWED:  # only the module's own errors, never ValueError & co
        assert error.__module__.startswith(PROJECT_PACKAGES), error
    seeds = [p for p in target.corpus.glob("*") if p.is_file()]
    assert seeds, f"no seed corpus in {target.corpus}"
    limit = getattr(module, "MAX_LEN", harness.DEFAULT_MAX_LEN)
    assert all(p.stat().st_size <= limit for p in seeds), "libFuzzer would cut these short"


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_corpus_replays_without_a_crash(target: harness.Target) -> None:
    result = harness.replay(target)
    assert result.files > 0
    assert not result.crashes, "\n".join(text for _path, text in result.crashes)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_a_short_fuzz_run_finds_nothing(target: harness.Target, tmp_path: Path) -> None:
    result = harness.run_target(target, seconds=SECONDS, crash_dir=tmp_path / "crashes",
                                work_dir=tmp_path / "work")
    assert not result.error
    assert result.executions > 0 and result.corpus_size > 0, result.line()
    assert not result.crashes, _crash_texts(result.crashes)


def test_the_harness_reports_a_broken_target(tmp_path: Path) -> None:
    toy = _toy(tmp_path, "toy", TOY_BROKEN)
    result = harness.run_target(toy, seconds=3, crash_dir=tmp_path / "crashes",
                                work_dir=tmp_path / "work")
    assert not result.error
    assert len(result.crashes) == 1, _crash_texts(result.crashes)  # KeyError is allowed
    (crash,) = result.crashes
    assert crash.read_bytes().startswith(b"boom")
    assert "ZeroDivisionError: the toy's bug" in crash.with_suffix(".txt").read_text()
    # The saved input is what replay reproduces the crash from.
    replayed = harness.replay(toy, [crash])
    assert len(replayed.crashes) == 1 and "ZeroDivisionError" in replayed.crashes[0][1]
    # The bug is still there: a second run that meets the same input first (its only
    # seed now, as it may be in a kept work corpus) reports it again, though that
    # input is saved already.
    for seed in toy.corpus.iterdir():
        seed.unlink()
    (toy.corpus / "kept").write_bytes(crash.read_bytes())
    again = harness.run_target(toy, seconds=1, crash_dir=tmp_path / "crashes",
                               work_dir=tmp_path / "work-again")
    assert again.crashes == [crash], again.line()


def test_a_fatal_signal_in_one_target_does_not_stop_the_next(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _toy(tmp_path, "aborts", TOY_ABORTS, seeds=(b"dea",))
    _toy(tmp_path, "clean", TOY_CLEAN, seeds=(b"vv", b"x"))
    code = harness.main(["run", "--targets-dir", str(tmp_path), "--seconds", "3",
                         "--crash-dir", str(tmp_path / "crashes"),
                         "--work-dir", str(tmp_path / "work")])
    lines = capsys.readouterr().out.splitlines()
    aborts = next(line for line in lines if line.startswith("aborts "))
    clean = next(line for line in lines if line.startswith("clean "))
    assert code == 1
    assert "crashes   1" in aborts, aborts
    saved = next((tmp_path / "crashes" / "aborts").glob("crash-*")).read_bytes()
    assert saved.startswith(b"dead"), saved
    assert "crashes   0" in clean and clean.endswith("ok"), clean


def test_replay_reports_a_crashing_corpus_file(tmp_path: Path) -> None:
    toy = _toy(tmp_path, "toy", TOY_BROKEN, seeds=(b"k", b"boom!"))
    result = harness.replay(toy)
    assert result.files == 2
    assert [path.name for path, _text in result.crashes] == ["seed-1"]
    assert harness.main(["replay", "--targets-dir", str(tmp_path), "toy"]) == 1
