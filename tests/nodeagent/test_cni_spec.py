"""The CNI plugin's sans-IO core: what the runtime hands in, what it gets back (spec 1.0.0)."""

from __future__ import annotations

import asyncio
import json

import pytest

from nodeagent.cni import spec
from nodeagent.cni.protocol import (
    MAX_FRAME,
    FrameReader,
    PluginCall,
    PluginReply,
    PodRequest,
    ProtocolError,
    encode_call,
    encode_reply,
    parse_call,
    parse_reply,
)
from nodeagent.cni_server import MAX_APPLIED, CniServer, Decision, decide
from tunnel.state import AMBIENT, DATAPLANE_LABEL, MeshState, Workload

pytestmark = pytest.mark.unit

PREV = {"cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                       {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "fd00::5/64", "interface": 1},
                {"address": "10.42.0.1/24", "interface": 0},
                {"address": "10.42.0.7/24", "gateway": "10.42.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
       "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-1;"
                   "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1"}


def _config(**extra: object) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "trellis-cni",
                       "prevResult": PREV, **extra}).encode()


def _error(call, *args) -> spec.CniError:  # type: ignore[no-untyped-def]
    with pytest.raises(spec.CniError) as caught:
        call(*args)
    return caught.value


def test_add_reads_environment_args_and_config() -> None:
    inv = spec.parse_invocation(ENV, _config(agentSocket="/run/t.sock", timeoutSeconds=3))
    assert (inv.command, inv.container_id, inv.netns, inv.ifname) == (
        "ADD", "c0ffee", "/run/netns/x", "eth0")
    assert (inv.pod_namespace, inv.pod_name, inv.pod_uid) == ("demo", "web-1", "u-1")
    assert inv.plugin == spec.PluginConfig("/run/t.sock", 3.0)


def test_add_passes_prev_result_through_in_the_configs_version() -> None:
    inv = spec.parse_invocation(ENV, _config(cniVersion="0.4.0"))
    out = spec.success_output(inv)
    assert out.exit_code == 0
    assert json.loads(out.stdout) == {**PREV, "cniVersion": "0.4.0"}


def test_pod_ip_prefers_an_ipv4_address_inside_the_sandbox() -> None:
    assert spec.pod_ip(spec.parse_invocation(ENV, _config())) == "10.42.0.7"


def test_pod_ip_without_interfaces_takes_the_first_ipv4() -> None:
    prev = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.1.2.3/16"}]}
    assert spec.pod_ip(spec.parse_invocation(ENV, _config(prevResult=prev))) == "10.1.2.3"


def test_pod_ip_missing_is_an_invalid_config() -> None:
    inv = spec.parse_invocation(ENV, _config(prevResult={"cniVersion": "1.0.0", "ips": []}))
    assert _error(spec.pod_ip, inv).code == spec.INVALID_CONFIG


@pytest.mark.parametrize(("env", "stdin", "code", "names"), [
    ({**ENV, "CNI_COMMAND": "BOGUS"}, _config(), spec.INVALID_ENVIRONMENT, "CNI_COMMAND"),
    ({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, _config(), spec.INVALID_ENVIRONMENT,
     "CNI_NETNS"),
    ({k: v for k, v in ENV.items() if k != "CNI_CONTAINERID"}, _config(),
     spec.INVALID_ENVIRONMENT, "CNI_CONTAINERID"),
    ({**ENV, "CNI_ARGS": "K8S_POD_NAME"}, _config(), spec.INVALID_ENVIRONMENT, "CNI_ARGS"),
    (ENV, b"{not json", spec.DECODE_FAILURE, "JSON"),
    (ENV, b"[]", spec.DECODE_FAILURE, "object"),
    (ENV, _config(cniVersion="9.9.9"), spec.INCOMPATIBLE_VERSION, "cniVersion"),
    (ENV, json.dumps({"cniVersion": "1.0.0", "name": "n"}).encode(), spec.INVALID_CONFIG,
     "prevResult"),
    (ENV, _config(agentSocket="relative.sock"), spec.INVALID_CONFIG, "agentSocket"),
    (ENV, _config(timeoutSeconds=0), spec.INVALID_CONFIG, "timeoutSeconds"),
    ({**ENV, "CNI_COMMAND": "CHECK"}, _config(cniVersion="0.3.1"), spec.INCOMPATIBLE_VERSION,
     "CHECK"),
])
def test_bad_input_is_one_cni_error_naming_the_field(env, stdin, code, names) -> None:  # type: ignore[no-untyped-def]
    err = _error(spec.parse_invocation, env, stdin)
    assert err.code == code
    assert names in err.msg


@pytest.mark.parametrize("stdin", [b"[" * 100_000, b'{"cniVersion": "1.0.0", "mtu": '
                                   + b"1" * 5000 + b"}"], ids=["deep", "long-integer"])
def test_json_the_decoder_cannot_take_is_a_decode_failure(stdin: bytes) -> None:
    # Found reviewing tests/fuzz/fuzz_cni_spec.py: RecursionError and the bare ValueError
    # of an over-long integer escaped parse_invocation, so the agent's CNI server closed
    # the call without an answer, and a traceback in its log, instead of a CNI error.
    assert _error(spec.parse_invocation, ENV, stdin).code == spec.DECODE_FAILURE


@pytest.mark.parametrize(("prev", "field"), [
    ({"ips": 5}, "prevResult.ips"),
    ({"ips": [{"address": "10.0.0.7/24", "interface": 0}], "interfaces": 5},
     "prevResult.interfaces"),
    ({"ips": [{"address": "10.0.0.7/24", "interface": 0}], "interfaces": ["eth0"]},
     "prevResult.interfaces[0]"),
], ids=["ips-not-a-list", "interfaces-not-a-list", "interface-not-an-object"])
def test_prev_result_of_the_wrong_shape_is_an_invalid_config(prev: dict[str, object],
                                                              field: str) -> None:
    # Found reviewing tests/fuzz/fuzz_cni_spec.py: TypeError and AttributeError out of
    # pod_ip, with the same effect as above.
    inv = spec.parse_invocation(ENV, _config(prevResult={"cniVersion": "1.0.0", **prev}))
    err = _error(spec.pod_ip, inv)
    assert err.code == spec.INVALID_CONFIG
    assert err.msg.startswith(field + ":"), err.msg


def test_del_tolerates_a_missing_netns_and_prev_result() -> None:
    env = {k: v for k, v in ENV.items() if k != "CNI_NETNS"} | {"CNI_COMMAND": "DEL"}
    inv = spec.parse_invocation(env, json.dumps({"cniVersion": "1.0.0", "name": "n"}).encode())
    assert (inv.netns, spec.success_output(inv)) == ("", spec.Output("", 0))


def test_version_answers_whatever_version_was_asked() -> None:
    inv = spec.parse_invocation({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    body = json.loads(spec.success_output(inv).stdout)
    assert body == {"cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    assert "1.0.0" in body["supportedVersions"]


def test_error_output_is_the_specs_error_object_and_a_failing_exit() -> None:
    out = spec.error_output(spec.CniError(11, "agent down", "/run/x.sock"), "0.4.0")
    assert out.exit_code != 0
    assert json.loads(out.stdout) == {"cniVersion": "0.4.0", "code": 11, "msg": "agent down",
                                      "details": "/run/x.sock"}


# -- plugin <-> agent frames ---------------------------------------------------------------

def test_frames_survive_being_fed_a_byte_at_a_time() -> None:
    call = PluginCall({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=demo;X=a=b"}, _config())
    reply = PluginReply(11, b'{"code": 11}\n')
    reader = FrameReader()
    frames = []
    for byte in encode_call(call) + encode_reply(reply):
        reader.feed(bytes([byte]))
        if (frame := reader.next_frame()) is not None:
            frames.append(frame)
    assert parse_call(frames[0]) == call
    assert parse_reply(frames[1]) == reply


def test_a_call_forwards_only_the_cni_variables() -> None:
    call = PluginCall({**ENV, "LD_PRELOAD": "/evil.so"}, b"{}")
    assert "LD_PRELOAD" not in parse_call(encode_call(call)[4:]).env


def test_a_frame_over_the_limit_is_refused() -> None:
    reader = FrameReader()
    reader.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next_frame()
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_call(PluginCall({}, b"x" * MAX_FRAME))


@pytest.mark.parametrize(("body", "problem"), [
    (b"trellis-cni/1\x00\x00{}", "trellis-cni/2"),
    (b"trellis-cni/2\x00CNI_COMMAND=ADD", "not terminated"),
    (b"trellis-cni/2\x00HOME=/root\x00\x00{}", "HOME"),
    (b"trellis-cni/2\x00CNI_COMMAND\x00\x00{}", "CNI_COMMAND"),
    (b"trellis-cni/2\x00CNI_COMMAND=ADD\x00CNI_COMMAND=DEL\x00\x00{}", "twice"),
    (b"trellis-cni/2\x00CNI_ARGS=\xff\x00\x00{}", "UTF-8"),
])
def test_bad_calls_name_what_is_wrong(body: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_call(body)


def test_excluded_namespaces_and_non_pods_pass_without_the_agent() -> None:
    config = _config(excludeNamespaces=["kube-system", "trellis-system"])
    for ns, passes in (("trellis-system", True), ("kube-system", True), ("demo", False)):
        env = {**ENV, "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME=p"}
        assert (spec.passes_without_agent(spec.parse_invocation(env, config))
                is not None) is passes
    no_pod = spec.parse_invocation({**ENV, "CNI_ARGS": ""}, config)
    assert "not a Kubernetes pod" in (spec.passes_without_agent(no_pod) or "")
    err = _error(spec.parse_invocation, ENV, _config(excludeNamespaces="kube-system"))
    assert "excludeNamespaces" in err.msg


# -- enrollment decision -------------------------------------------------------------------

def _workload(uid: str, enrolled: bool) -> Workload:
    return Workload(uid=uid, name="web-1", namespace="demo", node="n1", ip="10.0.0.1",
                    service_account="web", labels={}, enrolled=enrolled)


_REQ = PodRequest("add", "c0ffee", "/run/netns/x", "10.0.0.1", "demo", "web-1", "u-1")


@pytest.mark.parametrize(("state", "verdict"), [
    (None, Decision.RETRY),
    (MeshState(), Decision.RETRY),
    (MeshState(namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}}), Decision.REDIRECT),
    (MeshState(namespace_labels={"demo": {}}), Decision.SKIP),
    # The pod's own view wins over its namespace (a pod label can opt out).
    (MeshState(workloads=(_workload("u-1", False),),
               namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}}), Decision.SKIP),
    (MeshState(workloads=(_workload("u-1", True),), namespace_labels={}), Decision.REDIRECT),
])
def test_decide(state: MeshState | None, verdict: Decision) -> None:
    assert decide(state, _REQ)[0] is verdict



class _NoRules:
    name = "none"

    def apply(self, pod: object) -> None:
        pass

    def remove(self, pod: object) -> None:
        pass


def test_the_pods_add_redirected_are_remembered_until_del_within_a_bound(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = MeshState(namespace_labels={"demo": {DATAPLANE_LABEL: AMBIENT}})
    server = CniServer(tmp_path / "cni.sock", _NoRules(), lambda: state)

    async def calls() -> None:
        for i in range(MAX_APPLIED + 10):
            await server.handle(PodRequest("add", f"c-{i}", "/run/netns/x", "10.0.0.1", "demo",
                                           f"p-{i}", f"u-{i}"))
        await server.handle(PodRequest("del", f"c-{MAX_APPLIED + 9}", "", "", "demo", "p", ""))

    asyncio.run(calls())
    uids = [n.uid for n in server.applied()]
    assert len(uids) == MAX_APPLIED - 1 and uids[0] == "u-10"
    assert uids[-1] == f"u-{MAX_APPLIED + 8}"
