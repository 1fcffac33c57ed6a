"""The e2e labs: one fixture, ``lab``, parametrized over the redirect modes.

A lab costs seconds to minutes to bring up, so each mode's lab is session-wide
and made once. Every test runs against the iptables lab unless it says
otherwise with ``@pytest.mark.lab_modes("iptables", "ebpf")`` (or ``("ebpf",)``).
The parameter is session-scoped, so pytest groups the tests by mode and tears
the first lab down before it brings the second up: never two labs at a time,
which is what the shared 2-core machine, the host's BPF filesystem and the
agents' cgroups can take.

Each mode runs under its own namespace prefix (``tlab-e2e-``, ``tlab-ebpf-``)
and state directory, so a user's lab (``tlab-*``) on the same machine is
neither used nor swept away, and the eBPF lab's pins have a root of their own.

A test that takes its lab down is marked ``lab_teardown``; the ordering hook
below runs it after every other test of its mode, whatever the file names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.labctl import E2E_PREFIX, LAB_DIR, LAB_PREFIX, status, trellis

DEFAULT_MODES = ("iptables",)


@dataclass(frozen=True)
class LabMode:
    prefix: str
    up_args: tuple[str, ...]
    up_timeout: float


MODES = {
    "iptables": LabMode(E2E_PREFIX, (), 180),
    "ebpf": LabMode("tlab-ebpf-", ("--redirect", "ebpf"), 240),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab_modes(*modes): the redirect modes an e2e test runs in (iptables)")
    config.addinivalue_line(
        "markers", "lab_teardown: takes its lab down; runs after the rest of its mode")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lab" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("lab_modes")
    modes = marker.args if marker else DEFAULT_MODES
    unknown = set(modes) - set(MODES)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown lab mode {unknown}")
    metafunc.parametrize("lab", modes, indirect=True, scope="session")


def lab_mode(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("lab")


def teardowns_last(items: list[pytest.Item]) -> list[pytest.Item]:
    """``items`` with each ``lab_teardown`` test moved after the last other test of
    its mode (pytest has already grouped them by mode); others keep their order."""
    ordered = [i for i in items if not i.get_closest_marker("lab_teardown")]
    for item in (i for i in items if i.get_closest_marker("lab_teardown")):
        mode = lab_mode(item)
        same = [n for n, other in enumerate(ordered) if lab_mode(other) == mode]
        ordered.insert(same[-1] + 1 if same else len(ordered), item)
    return ordered


@pytest.hookimpl(trylast=True)  # after pytest's own fixture-driven reordering
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items[:] = teardowns_last(items)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    name = getattr(request, "param", DEFAULT_MODES[0])
    mode = MODES[name]
    saved = {k: os.environ.get(k) for k in (LAB_DIR, LAB_PREFIX)}
    os.environ[LAB_DIR] = str(tmp_path_factory.mktemp(f"lab-{name}"))
    os.environ[LAB_PREFIX] = mode.prefix
    trellis("lab", "down")
    try:
        trellis("lab", "up", *mode.up_args, timeout=mode.up_timeout)
        yield status()
    finally:
        trellis("lab", "down")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
