"""The C plugin's own decisions, with no agent: VERSION, pass-through, and bad input.

Every case runs twice: on the static binary ``make setup`` builds, and on the same
source built with AddressSanitizer and UBSan, so a read past a buffer or an
undefined operation fails the test instead of going unnoticed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.cni import spec
from nodeagent.cni.install import BUILT_PLUGIN

pytestmark = pytest.mark.inprocess

SOURCE = Path(__file__).resolve().parents[2] / "nodeagent" / "cni" / "plugin" / "trellis_cni.c"
PREV = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.42.0.7/24", "interface": 0}], "dns": {"nameservers": ["\u00e9"]}}


@pytest.fixture(scope="module", params=["static", "sanitized"])
def plugin(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Path]:
    if request.param == "static":
        yield BUILT_PLUGIN
        return
    out = tmp_path_factory.mktemp("asan") / "trellis-cni"
    subprocess.run(["gcc", "-std=c11", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(SOURCE)], check=True, timeout=120)
    yield out


def _run(plugin: Path, stdin: bytes, command: str = "ADD", namespace: str = "kube-system",
         **env: str) -> subprocess.CompletedProcess[bytes]:
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p",
            "ASAN_OPTIONS": "detect_leaks=0"}
    done = subprocess.run([str(plugin)], input=stdin, env={**base, **env}, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode in (0, 1), f"crashed ({done.returncode}): {done.stderr!r}"
    return done


def _config(**fields: object) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "trellis-cni",
                       "agentSocket": "/nonexistent/cni.sock",
                       "excludeNamespaces": ["kube-system"], **fields}).encode()


def test_version_matches_what_the_agent_says(plugin: Path) -> None:
    done = _run(plugin, b'{"cniVersion": "0.4.0"}', command="VERSION")
    assert json.loads(done.stdout) == json.loads(spec.version_output("0.4.0").stdout)


def test_an_excluded_pod_gets_exactly_what_the_agent_would_print(plugin: Path) -> None:
    stdin = _config(prevResult=PREV)
    done = _run(plugin, stdin)
    assert done.returncode == 0, done.stdout
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/run/netns/x",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    expected = spec.success_output(spec.parse_invocation(env, stdin))
    assert json.loads(done.stdout) == json.loads(expected.stdout)
    for command in ("DEL", "CHECK"):
        assert _run(plugin, stdin, command=command).stdout == b""


def test_an_escaped_namespace_and_duplicate_keys_read_as_json_reads_them(plugin: Path) -> None:
    stdin = (b'{"cniVersion": "1.0.0", "excludeNamespaces": ["x"], "agentSocket": "/no/s",'
             b' "excludeNamespaces": ["kube\\u002dsystem"], "prevResult": {"ips": []}}')
    assert _run(plugin, stdin).returncode == 0
    assert json.loads(_run(plugin, stdin, namespace="x").stdout)["code"] == 11


@pytest.mark.parametrize(("stdin", "code"), [
    (b"", spec.DECODE_FAILURE),
    (b"[]", spec.DECODE_FAILURE),
    (b'{"cniVersion": "1.0.0"', spec.DECODE_FAILURE),
    (b'{"cniVersion": "1.0.0"} trailing', spec.DECODE_FAILURE),
    (b'{"a": "\\x"}', spec.DECODE_FAILURE),
    (b'{"a": "\\u12"}', spec.DECODE_FAILURE),
    (b'{"a": "ctl\x01"}', spec.DECODE_FAILURE),
    (b'{"a": 01}', spec.DECODE_FAILURE),
    (b'{"a": -}', spec.DECODE_FAILURE),
    (b'{"a": 1.}', spec.DECODE_FAILURE),
    (b'{"a": tru}', spec.DECODE_FAILURE),
    (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", spec.DECODE_FAILURE),
    (b'{"a": ' + b"[" * 60 + b"]" * 60 + b', "agentSocket": 1}', spec.INVALID_CONFIG),
    (_config(agentSocket="relative.sock"), spec.INVALID_CONFIG),
    (_config(agentSocket="/" + "a" * 200), spec.INVALID_CONFIG),
    (_config(agentSocket="/a\u0000b"), spec.INVALID_CONFIG),
    (_config(timeoutSeconds=0), spec.INVALID_CONFIG),
    (b'{"cniVersion": "1.0.0", "timeoutSeconds": 1e999}', spec.INVALID_CONFIG),
    (_config(timeoutSeconds="5"), spec.INVALID_CONFIG),
    (_config(excludeNamespaces="kube-system"), spec.INVALID_CONFIG),
    (_config(prevResult=[]), spec.INVALID_CONFIG),
    (_config(), spec.INVALID_CONFIG),  # an excluded pod, but no prevResult to pass on
    (b" " * (1 << 20) + b"{}", spec.DECODE_FAILURE),  # over 1 MiB
])
def test_bad_input_is_one_cni_error_and_never_a_crash(plugin: Path, stdin: bytes,
                                                       code: int) -> None:
    done = _run(plugin, stdin)
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert error["code"] == code, error


def test_a_namespace_too_long_to_read_is_never_taken_as_none(plugin: Path) -> None:
    done = _run(plugin, _config(prevResult=PREV), namespace="n" * 300)
    assert json.loads(done.stdout)["code"] == spec.INVALID_ENVIRONMENT


# -- the C JSON scanner against Python's json, on generated documents ----------------------

_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prev=st.dictionaries(st.text(max_size=10), _values, max_size=6),
       junk=st.dictionaries(st.sampled_from(["a", "plugins", "ipam", "x\\u0041"]), _values,
                            max_size=3),
       ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_what_the_plugin_passes_on_is_what_json_reads(
        plugin: Path, prev: dict[str, object], junk: dict[str, object], ascii_only: bool,
        indent: int | None) -> None:
    config = {**junk, "cniVersion": "1.0.0", "agentSocket": "/nonexistent/cni.sock",
              "excludeNamespaces": ["kube-system"], "prevResult": prev}
    stdin = json.dumps(config, ensure_ascii=ascii_only, indent=indent).encode()
    done = _run(plugin, stdin)
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout) == {**prev, "cniVersion": "1.0.0"}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_bytes_give_an_answer_and_never_a_crash(plugin: Path, data: bytes) -> None:
    done = _run(plugin, b'{"cniVersion":"1.0.0","excludeNamespaces":["kube-system"],' + data)
    if done.stdout:
        json.loads(done.stdout)
