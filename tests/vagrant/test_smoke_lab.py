"""vagrant/smoke.py, the Vagrant cluster's smoke test, run against the namespace lab.

The VMs cannot run in CI; this keeps their smoke script from rotting. The lab
gets its own namespace prefix and directory so it never meets the e2e suite's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRELLIS = [sys.executable, "-m", "trellis"]
PREFIX = "tlab-smk-"


@pytest.fixture
def lab_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "TRELLIS_LAB_NETNS_PREFIX": PREFIX,
           "TRELLIS_LAB_DIR": str(tmp_path / "lab")}
    subprocess.run([*TRELLIS, "lab", "down"], env=env, capture_output=True, timeout=120,
                   check=False, cwd=ROOT)  # a lab left by an interrupted run
    try:
        up = subprocess.run([*TRELLIS, "lab", "up"], env=env, capture_output=True, text=True,
                            timeout=300, check=False, cwd=ROOT)
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        down = subprocess.run([*TRELLIS, "lab", "down"], env=env, capture_output=True,
                              text=True, timeout=120, check=False, cwd=ROOT)
        assert down.returncode == 0, down.stderr


def test_smoke_script_passes_against_the_lab(lab_env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "vagrant" / "smoke.py"), "--driver", "lab",
         "--trellis", f"{sys.executable} -m trellis"],
        env=lab_env, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed, 0 failed" in done.stdout
