"""`lab down` leaves nothing behind, and `lab up` works again.

It takes the shared lab down, so it is marked ``lab_teardown``: conftest.py runs
it after every other test of its lab, whatever this file is called."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.labctl import E2E_PREFIX, curl_json, pod, trellis

pytestmark = pytest.mark.e2e


@pytest.mark.lab_teardown
def test_down_leaves_nothing_and_up_works_again(lab: dict) -> None:
    lab_dir = Path(os.environ["TRELLIS_LAB_DIR"])
    pids = [int(p.read_text()) for p in (lab_dir / "pids").glob("*.pid")]
    assert pids
    trellis("lab", "down")
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout.split() if n.startswith(E2E_PREFIX)]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still runs"
    assert not lab_dir.exists() or not any(lab_dir.iterdir())
    trellis("lab", "up", timeout=180)
    backend2 = pod("backend-2")
    assert curl_json("frontend-1", f"http://{backend2['ip']}:8080/")["pod"] == "backend-2"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
