"""The eBPF image's bundled kernel headers (deploy/Dockerfile, stage kernel-headers;
the chart's ebpf.kernelHeaders=bundled): bcc compiles Trellis's programs from a
tree merged the way that stage merges Debian's two header packages, found through
BCC_KERNEL_SOURCE alone, on a node whose /lib/modules has no headers at all.

Root: a private mount namespace hides /lib/modules, and bcc creates the programs'
maps (pinned in a throw-away bpffs directory, removed afterwards).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
COMPILE = """
import sys
from bcc import BPF
bpf = BPF(text=open(sys.argv[1], "rb").read(), cflags=[f'-DPIN_DIR="{sys.argv[2]}"'])
bpf.cleanup()
print("compiled")
"""


def _debian_headers() -> tuple[Path, Path]:
    """The arch and common header trees Debian's linux-headers-amd64 installs."""
    arch = sorted(Path("/usr/src").glob("linux-headers-*-amd64"))
    if not arch:
        pytest.fail("no /usr/src/linux-headers-*-amd64: run 'make setup' (linux-headers-amd64)")
    common = arch[-1].with_name(arch[-1].name.removesuffix("-amd64") + "-common")
    assert common.is_dir(), f"{common} is missing"
    return arch[-1], common


@pytest.fixture
def bundled(tmp_path: Path) -> tuple[Path, str]:
    """Where the merged tree appears, and the mount that makes it: the arch tree over
    the common one, as the Dockerfile's two `cp -a` leave them (an overlay instead of
    a 78 MB copy; mounted only inside the test's mount namespace)."""
    arch, common = _debian_headers()
    tree = tmp_path / "kernel-headers"
    tree.mkdir()
    return tree, f"mount -t overlay overlay -o lowerdir={arch}:{common} {tree}"


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path("/sys/fs/bpf") / f"trellis-test-headers-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _compile_without_host_headers(pin: Path, env_source: Path | None,
                                  setup: str = "true") -> subprocess.CompletedProcess[str]:
    """bcc in a mount namespace where /lib/modules is empty (no build/ link)."""
    env = f"BCC_KERNEL_SOURCE={env_source}" if env_source else "BCC_KERNEL_SOURCE="
    script = (f'{setup} && mount -t tmpfs none /lib/modules && exec env {env} '
              f'"{sys.executable}" -c "$0" "$1" "$2"')
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, COMPILE,
         str(ROOT / "bpf" / "redirect.c"), str(pin)],
        capture_output=True, text=True, timeout=180, check=False)


def test_bcc_compiles_with_the_bundled_headers_alone(bundled: tuple[Path, str],
                                                     pin_dir: Path) -> None:
    tree, mount = bundled
    done = _compile_without_host_headers(pin_dir, tree, mount)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]


def test_without_headers_bcc_cannot_compile(pin_dir: Path) -> None:
    # The control: the same node without BCC_KERNEL_SOURCE has nothing to compile with,
    # so the test above passes because of the bundled tree.
    done = _compile_without_host_headers(pin_dir, None)
    assert done.returncode != 0
    assert "Failed to compile BPF module" in done.stderr
