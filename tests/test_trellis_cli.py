"""The ``trellis`` dispatcher: which missing command modules it skips, and which it must not."""

from __future__ import annotations

import argparse
import importlib.abc
import sys

import pytest

from trellis import cli

pytestmark = pytest.mark.unit


def _commands(monkeypatch: pytest.MonkeyPatch, modules: tuple[str, ...]) -> set[str]:
    monkeypatch.setattr(cli, "COMMAND_MODULES", modules)
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


class _LeftOut(importlib.abc.MetaPathFinder):
    """What the image does: the package is simply not there."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] == self.package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_every_registered_command_module_exists() -> None:
    # The list used to name identity.cli, which does not exist, and the import
    # error was swallowed: each entry must import on a full checkout.
    for name in cli.COMMAND_MODULES:
        assert hasattr(__import__(name, fromlist=["register"]), "register"), name


def test_a_typo_in_the_command_list_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModuleNotFoundError, match="nodeagnet"):
        _commands(monkeypatch, ("nodeagnet.cli", "policy.cli"))


def test_a_missing_command_module_of_a_present_package_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # lab is an optional package, but when it is there its cli must be too.
    with pytest.raises(ModuleNotFoundError, match=r"lab\.clii"):
        _commands(monkeypatch, ("lab.clii",))


def test_an_optional_package_left_out_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # Positive control for the two above: the image leaves bench out, and the
    # rest of the commands still register.
    for name in [m for m in sys.modules if m.partition(".")[0] == "bench"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_LeftOut("bench"), *sys.meta_path])
    names = _commands(monkeypatch, ("bench.cli", "policy.cli"))
    assert "policy" in names and "bench" not in names
