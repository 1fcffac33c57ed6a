"""The Vagrant lab's files: `vagrant validate` (offline, no plugin to install) and
shell syntax of the provisioning scripts. The VMs themselves never run in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.inprocess

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"
MACHINES = ("cp", "worker-1", "worker-2")


def _vagrant(*args: str, provider: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("vagrant")
    if binary is None:
        pytest.fail("vagrant is not installed: run 'make setup' (Debian package vagrant)")
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return subprocess.run([binary, *args], cwd=VAGRANT_DIR, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_vagrantfile_validates_for_every_machine() -> None:
    # --ignore-provider: VirtualBox cannot be installed from Debian's archive, and a
    # provider that is not usable here fails validation before reading the file.
    done = _vagrant("validate", "--ignore-provider")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
    for machine in MACHINES:
        assert f"==> {machine}:" in done.stdout


def test_vagrantfile_validates_with_the_libvirt_provider_config() -> None:
    done = _vagrant("validate", provider="libvirt")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (VAGRANT_DIR / "provision").glob("*.sh")))
def test_provisioning_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(VAGRANT_DIR / "provision" / script)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
