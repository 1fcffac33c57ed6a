"""The Vagrant lab's provisioning, run here with stand-in commands (no VM runs in CI):
waits that end in a failure instead of carrying on, the images built once on the
server and imported everywhere from its one tarball, the host-side trigger that
waits out a parallel `vagrant up` instead of racing it, and the smoke script
reading the proxy's metrics on a cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"
PROVISION = VAGRANT / "provision"
LIB = PROVISION / "lib.sh"


def _bash(script: str, env: dict[str, str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def test_wait_for_fails_the_script_when_time_runs_out() -> None:
    done = _bash(f'source {LIB}; WAIT_INTERVAL_S=0.1 wait_for "the moon" 1 false; echo after')
    assert done.returncode == 1
    assert "timed out after 1s waiting for: the moon" in done.stderr
    assert "after" not in done.stdout  # the script stops there


def test_wait_for_returns_once_the_command_succeeds() -> None:
    marker = "/tmp/trellis-wait-for-test"
    script = (f'rm -f {marker}; source {LIB}; n=0; ready() {{ n=$((n+1)); [ $n -ge 3 ]; }}; '
              f'WAIT_INTERVAL_S=0.05 wait_for "three tries" 10 ready; echo "after $n"')
    done = _bash(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "after 3"


def test_no_provisioning_script_waits_on_its_own() -> None:
    # Every wait goes through wait_for (bounded, failing): no bare sleep loops.
    for script in PROVISION.glob("*.sh"):
        text = script.read_text()
        if script != LIB:
            assert "sleep" not in text, f"{script.name} sleeps outside wait_for"
        assert not re.search(r"for \w+ in \$\(seq", text), f"{script.name} has a counted loop"


STUBS = {
    # docker: build records its target; save writes a tarball of the tags it saves.
    "docker": """#!/bin/bash
echo "docker $*" >> "$STUB_LOG"
if [ "$1" = save ]; then out=$3; shift 3; echo "images: $*" > "$out"; fi
""",
    # k3s: containerd is up; import records the sha256 of what it imports.
    "k3s": """#!/bin/bash
if [ "$2" = version ]; then exit 0; fi
if [ "$2 $3" = "images import" ]; then
  echo "import $(hostname) $(sha256sum < "$4" | cut -c1-64)" >> "$STUB_LOG"; fi
""",
    # curl -sfo OUT http://SERVER/NAME: from the "server's" directory, 404 if absent.
    "curl": """#!/bin/bash
out=$2; name=${3##*/}
[ -e "$STUB_SERVER_DIR/$name" ] || exit 22
cp "$STUB_SERVER_DIR/$name" "$out"
""",
    "systemctl": "#!/bin/bash\nexit 0\n",
    "systemd-run": "#!/bin/bash\necho \"serve $*\" >> \"$STUB_LOG\"\n",
}


def _image_sh(tmp_path: Path, role: str, image_dir: Path, server_dir: Path,
              timeout_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in STUBS.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
           "STUB_SERVER_DIR": str(server_dir), "K3S_ROLE": role, "SERVER_IP": "192.0.2.10",
           "TRELLIS_SRC": "/src", "TRELLIS_IMAGE_DIR": str(image_dir),
           "TRELLIS_LIB": str(LIB), "WAIT_INTERVAL_S": "0.05", **(timeout_env or {})}
    return subprocess.run(["bash", str(PROVISION / "image.sh")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env}, check=False)


def test_images_are_built_once_and_every_node_imports_the_same_tarball(tmp_path: Path) -> None:
    server_dir = tmp_path / "cp"
    runs = [("server", server_dir), ("agent", tmp_path / "worker-1"),
            ("agent", tmp_path / "worker-2")]
    for role, image_dir in runs:
        done = _image_sh(tmp_path, role, image_dir, server_dir)
        assert done.returncode == 0, (role, done.stderr)
    log = (tmp_path / "log").read_text().splitlines()
    builds = [line for line in log if line.startswith("docker build")]
    assert len(builds) == 2, builds  # trellis:dev and trellis-demo:dev, once each
    assert any("-t trellis:dev" in b for b in builds)
    assert any("--target demo -t trellis-demo:dev" in b for b in builds)
    tarball = (server_dir / "trellis-images.tar").read_bytes()
    assert tarball.strip() == b"images: trellis:dev trellis-demo:dev"
    imports = [line.split()[2] for line in log if line.startswith("import")]
    assert imports == [hashlib.sha256(tarball).hexdigest()] * 3
    assert sum(line.startswith("serve") for line in log) == 1


def test_an_agent_refuses_a_tarball_that_does_not_match_its_sha256(tmp_path: Path) -> None:
    server_dir = tmp_path / "cp"
    assert _image_sh(tmp_path, "server", server_dir, server_dir).returncode == 0
    imports_before = (tmp_path / "log").read_text().count("import ")
    (server_dir / "trellis-images.tar").write_text("something else\n")
    done = _image_sh(tmp_path, "agent", tmp_path / "worker-1", server_dir)
    assert done.returncode != 0
    assert "FAILED" in done.stdout + done.stderr  # sha256sum -c names the mismatch
    assert (tmp_path / "log").read_text().count("import ") == imports_before


def test_an_agent_gives_up_when_the_server_never_serves(tmp_path: Path) -> None:
    script = (PROVISION / "image.sh").read_text()
    assert 'wait_for "the images from' in script
    # The same wait with a short bound: it must fail, not import nothing.
    done = _bash(f'source {LIB}; fetch() {{ false; }}; '
                 f'WAIT_INTERVAL_S=0.05 wait_for "the images from the server" 1 fetch')
    assert done.returncode == 1 and "timed out" in done.stderr


def _after_up(tmp_path: Path, answers: list[tuple[int, str]]) -> subprocess.CompletedProcess[str]:
    """after-up.sh with a stand-in `vagrant` that gives these answers in turn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "answers").write_text(json.dumps(answers))
    (bin_dir / "vagrant").write_text(f"""#!{sys.executable}
import json, pathlib, sys
state = pathlib.Path({str(tmp_path / "calls")!r})
calls = int(state.read_text()) if state.exists() else 0
state.write_text(str(calls + 1))
code, text = json.loads(pathlib.Path({str(tmp_path / "answers")!r}).read_text())[calls]
print(text, " ".join(sys.argv[1:]))
sys.exit(code)
""")
    (bin_dir / "vagrant").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WAIT_INTERVAL_S": "0.05"}
    return subprocess.run(["bash", str(PROVISION / "after-up.sh")], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


LOCKED = ("An action 'provision' was attempted on the machine 'cp', but another process "
          "is already executing an action on the machine.")


def test_after_up_waits_while_a_parallel_up_holds_cp(tmp_path: Path) -> None:
    done = _after_up(tmp_path, [(1, LOCKED), (1, LOCKED), (0, "smoke: all checks passed")])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text() == "3"
    assert "provision cp --provision-with trellis" in done.stdout


def test_after_up_fails_at_once_on_any_other_error(tmp_path: Path) -> None:
    done = _after_up(tmp_path, [(1, "smoke: FAILED mutual TLS"), (0, "never asked")])
    assert done.returncode == 1
    assert (tmp_path / "calls").read_text() == "1"


def test_the_smoke_script_reads_the_proxy_pods_metrics(tmp_path: Path) -> None:
    pods = {"items": [
        {"metadata": {"name": "trellis-agent-a", "labels": {}}, "spec": {"nodeName": "n1"},
         "status": {"phase": "Running"}},
        {"metadata": {"name": "trellis-proxy-b", "labels": {}}, "spec": {"nodeName": "n1"},
         "status": {"phase": "Running"}}]}
    kubectl = tmp_path / "kubectl"
    # Answers `get pods -l SELECTOR` with the pods that selector names, `get --raw PATH`
    # with the path it was asked for.
    kubectl.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
if "--raw" in args:
    print(args[args.index("--raw") + 1])
else:
    selector = args[args.index("-l") + 1]
    component = selector.split("=")[1]
    pods = json.loads({json.dumps(json.dumps(pods))})
    pods["items"] = [p for p in pods["items"] if p["metadata"]["name"].split("-")[1] == component]
    print(json.dumps(pods))
""")
    kubectl.chmod(0o755)
    sys.path.insert(0, str(VAGRANT))
    try:
        import smoke
    finally:
        sys.path.remove(str(VAGRANT))
    driver = smoke.KubectlDriver([str(kubectl)], "trellis-system")
    assert driver.metrics("n1").strip() == (
        "/api/v1/namespaces/trellis-system/pods/trellis-proxy-b:15020/proxy/metrics")
    with pytest.raises(RuntimeError, match="no running trellis proxy on node n2"):
        driver.metrics("n2")
