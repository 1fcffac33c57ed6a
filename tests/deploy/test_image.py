"""deploy/Dockerfile, read as a build would read it (no Docker engine runs here or in
CI, so the image is never built by the tests): the base pinned by digest, Python
dependencies installed only from the hashed lock, no lab/bench in the image and
nothing in it importing them, a non-root default user, an eBPF target with bcc and
kernel headers, and what the image's entry point does without lab/bench.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
LOCK = ROOT / "deploy" / "requirements.lock"
FIRST_PARTY = {"identity", "policy", "tunnel", "nodeagent", "bpf", "trellis", "lab", "bench",
               "waypoint"}
LEFT_OUT = {"lab", "bench"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, by stage name ('' for the unnamed last one)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in _instructions():
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            current = stages.setdefault(name, [])
        current.append((word, rest))
    return stages


def _base() -> str:
    args = [rest for word, rest in _instructions() if word == "ARG" and rest.startswith("BASE=")]
    assert len(args) == 1, "expected one ARG BASE=... that every stage builds from"
    return args[0].removeprefix("BASE=")


def test_every_stage_starts_from_the_base_pinned_by_digest() -> None:
    assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}", _base()), _base()
    stages = _stages()
    for name, instructions in stages.items():
        image = instructions[0][1].split()[0]
        # ${BASE}, or an earlier stage (which itself starts from ${BASE}).
        assert image == "${BASE}" or image in stages, f"stage {name!r} starts FROM {image}"


def test_python_dependencies_come_only_from_the_hashed_lock() -> None:
    runs = [rest for word, rest in _stages()["runtime"] if word == "RUN" and "pip install" in rest]
    assert len(runs) == 2, runs
    locked, project = runs
    for flag in ("--require-hashes", "--no-deps", "--only-binary=:all:",
                 "-r /tmp/requirements.lock"):
        assert flag in locked
    # The project itself: nothing fetched, nothing resolved.
    for flag in ("--no-deps", "--no-index", "--no-build-isolation"):
        assert flag in project


def _lock() -> dict[str, list[str]]:
    """Package name (normalised) -> the hashes the lock gives it."""
    entries: dict[str, list[str]] = {}
    name = ""
    for line in LOCK.read_text().splitlines():
        if line.startswith(("#", " ", "\t")) is False and "==" in line:
            name = re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
            entries[name] = []
        elif "--hash=sha256:" in line:
            digest = line.split("--hash=sha256:")[1].split()[0]
            assert re.fullmatch(r"[0-9a-f]{64}", digest), line
            entries[name].append(digest)
    return entries


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = _lock()
    assert all(lock.values()), [name for name, hashes in lock.items() if not hashes]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = project["project"]["dependencies"] + project["build-system"]["requires"]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()
        assert name in lock, f"{requirement} (pyproject.toml) is not in {LOCK.name}"
    assert not {"pytest", "hypothesis", "scapy", "matplotlib"} & lock.keys()


def _shipped() -> set[str]:
    copies = [rest.split() for word, rest in _stages()["runtime"] if word == "COPY"]
    return {Path(args[0]).name for args in copies
            if not args[0].startswith("--") and (ROOT / args[0]).is_dir()}


def test_no_lab_or_bench_in_the_image() -> None:
    shipped = _shipped()
    assert {"identity", "policy", "tunnel", "nodeagent", "trellis"} <= shipped
    assert not LEFT_OUT & shipped
    # Nor anything the whole build context would bring along.
    assert not any(word in ("COPY", "ADD") and rest.split()[0] == "."
                   for stage in _stages().values() for word, rest in stage)


def test_nothing_in_the_image_imports_what_it_leaves_out() -> None:
    shipped = _shipped()
    missing = []
    for package in sorted(shipped & FIRST_PARTY):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in FIRST_PARTY and top not in shipped:
                        missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_image_runs_as_non_root_unless_the_pod_says_otherwise() -> None:
    for name in ("runtime", "ebpf"):
        users = [rest for word, rest in _stages()[name] if word == "USER"]
        assert users and users[-1] == "65532:65532", (name, users)


def test_the_ebpf_target_adds_bcc_and_kernel_headers() -> None:
    stages = _stages()
    ebpf = stages["ebpf"]
    assert ebpf[0][1] == "runtime AS ebpf"
    text = " ".join(rest for _, rest in ebpf)
    assert "libbpfcc" in text and "python3-bpfcc" in text and "import bcc" in text
    assert "COPY --from=kernel-headers /kernel-headers /opt/trellis/kernel-headers" in (
        " ".join(f"{w} {r}" for w, r in ebpf))
    # A plain `docker build` gives the image without bcc.
    assert stages[""][0][1] == "runtime"


def test_the_demo_app_has_an_image_of_its_own() -> None:
    demo = _stages()["demo"]
    copies = [rest for word, rest in demo if word == "COPY"]
    assert copies == ["lab/app.py /opt/trellis-demo/app.py"]  # the app, not the lab
    assert ("USER", "65532:65532") in demo
    # Standard library only: it runs without the mesh's packages.
    tree = ast.parse((ROOT / "lab" / "app.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names} | {
        node.module.split(".")[0] for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


_BLOCKED_RUN = """
import importlib.abc, runpy, sys
class LeftOut(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, LeftOut())
for name in {blocked!r}:
    sys.modules.pop(name, None)
sys.argv = ["trellis", *sys.argv[1:]]
runpy.run_module("trellis.cli", run_name="__main__")
"""


def _trellis_without(blocked: set[str], *args: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCKED_RUN.format(blocked=sorted(blocked))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)


def _commands(help_text: str) -> set[str]:
    return set(re.findall(r"^    ([a-z]+) ", help_text, re.M))


def test_the_entry_point_works_without_lab_and_bench() -> None:
    with_all = _trellis_without(set(), "--help")
    done = _trellis_without(LEFT_OUT, "--help")
    assert with_all.returncode == 0 and done.returncode == 0, done.stderr
    assert {"lab", "bench"} <= _commands(with_all.stdout)  # the check sees them when there
    assert _commands(done.stdout) == _commands(with_all.stdout) - LEFT_OUT
    assert {"agent", "proxy", "ca", "cni"} <= _commands(done.stdout)
    for command in (("proxy", "run", "--help"), ("agent", "run", "--help"),
                    ("ca", "serve", "--help"), ("cni", "install", "--help")):
        done = _trellis_without(LEFT_OUT, *command)
        assert done.returncode == 0, (command, done.stderr)


def test_a_missing_dependency_is_still_an_error() -> None:
    # Control for the above: leaving out a dependency of a shipped package (PyYAML,
    # which the node agent's commands import) is not skipped like a left-out package.
    done = _trellis_without({"yaml"}, "--help")
    assert done.returncode != 0
    assert "No module named 'yaml" in done.stderr
