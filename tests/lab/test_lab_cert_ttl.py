"""`lab up --cert-ttl`: checked once, kept in the lab directory, handed to the CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import LabError
from lab.plan import plan_lab
from lab.processes import ca_process, check_cert_ttl, choose_cert_ttl, read_cert_ttl
from lab.spec import build_spec, load_documents
from lab.state import LabDir

pytestmark = pytest.mark.unit

POD = "kind: Pod\nmetadata: {name: a}\nspec: {nodeName: node-1}\n"


@pytest.mark.parametrize("value", ["60s", "1m", "90s", "10m", "24h", "2160h"])
def test_lifetimes_the_ca_accepts_pass(value: str) -> None:
    assert check_cert_ttl(value) == value


@pytest.mark.parametrize("value", ["59s", "0m", "1d", "m", "1.5m", "-1m", "2161h", " 1m", ""])
def test_anything_else_is_one_line_naming_the_option(value: str) -> None:
    with pytest.raises(LabError, match=r"^--cert-ttl: .* from 1 minute to 90 days$"):
        check_cert_ttl(value)


def test_the_lifetime_is_kept_and_reaches_the_ca_command_line(tmp_path: Path) -> None:
    labdir = LabDir(tmp_path / "lab")
    plan = plan_lab(build_spec(load_documents(POD, "t"), "t"))
    assert "--cert-lifetime" not in ca_process(plan, labdir).argv  # the CA's default
    assert choose_cert_ttl(labdir, "90s", lab_is_up=False) == "90s"
    assert choose_cert_ttl(labdir, None, lab_is_up=True) == "90s"  # a later `lab up`
    assert read_cert_ttl(labdir) == "90s"
    assert ca_process(plan, labdir).argv[-2:] == ("--cert-lifetime", "90s")


def test_a_running_lab_keeps_its_lifetime(tmp_path: Path) -> None:
    labdir = LabDir(tmp_path)
    choose_cert_ttl(labdir, "2m", lab_is_up=False)
    with pytest.raises(LabError, match=r"up with --cert-ttl 2m; run `trellis lab down`"):
        choose_cert_ttl(labdir, "5m", lab_is_up=True)
    assert choose_cert_ttl(labdir, "2m", lab_is_up=True) == "2m"


def test_a_bad_value_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    labdir = LabDir(tmp_path / "lab")
    with pytest.raises(LabError, match="--cert-ttl"):
        choose_cert_ttl(labdir, "5s", lab_is_up=False)
    assert not labdir.root.exists()
