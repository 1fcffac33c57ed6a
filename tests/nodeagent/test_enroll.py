"""Which pods a node redirects, and the diff between two snapshots."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.enroll import EnrollmentChanges, diff, enrolled_pods
from nodeagent.redirect import PodNetwork, RedirectError
from tunnel.state import MeshState, Workload

pytestmark = pytest.mark.unit


def workload(uid: str, *, node: str = "node-1", ip: str = "198.18.0.1", enrolled: bool = True,
             netns: str = "/run/netns/x", sa: str = "default") -> Workload:
    return Workload(uid=uid, name=uid, namespace="demo", node=node, ip=ip, service_account=sa,
                    labels=MappingProxyType({}), enrolled=enrolled, netns=netns)


def test_only_enrolled_pods_with_an_ip_on_this_node() -> None:
    state = MeshState(workloads=(
        workload("c", ip="198.18.0.3"),
        workload("a", ip="198.18.0.1"),
        workload("other-node", node="node-2", ip="198.18.0.4"),
        workload("not-enrolled", enrolled=False, ip="198.18.0.5"),
        workload("pending", ip=""),
    ))
    assert [w.uid for w in enrolled_pods(state, "node-1")] == ["a", "c"]
    assert enrolled_pods(state, "node-9") == ()


def test_diff_by_uid() -> None:
    old = (workload("keep"), workload("gone"), workload("relabel"))
    new = (workload("keep"), workload("new"), workload("relabel", sa="other"))
    changes = diff(old, new)
    assert [w.uid for w in changes.added] == ["new"]
    assert [w.uid for w in changes.removed] == ["gone"]
    assert changes.changed == (new[2],)


@pytest.mark.parametrize("field", ["ip", "netns"])
def test_a_new_ip_or_namespace_is_remove_then_add(field: str) -> None:
    old = workload("p", ip="198.18.0.1", netns="/run/netns/a")
    new = dataclasses.replace(old, **{field: "198.18.0.2" if field == "ip" else "/run/netns/b"})
    changes = diff([old], [new])
    assert (changes.removed, changes.added, changes.changed) == ((old,), (new,), ())


def test_no_change_is_empty() -> None:
    same = (workload("a"), workload("b"))
    assert diff(same, same) == EnrollmentChanges()
    assert diff(same, same).empty
    assert not diff((), same).empty


_pods = st.lists(st.builds(workload, st.sampled_from("abcdef"),
                           ip=st.sampled_from(["198.18.0.1", "198.18.0.2"]),
                           sa=st.sampled_from(["x", "y"])),
                 unique_by=lambda w: w.uid, max_size=6)


@given(_pods, _pods)
def test_applying_a_diff_to_old_gives_new(old: list[Workload], new: list[Workload]) -> None:
    changes = diff(old, new)
    result = {w.uid: w for w in old}
    for w in changes.removed:
        del result[w.uid]
    for w in (*changes.added, *changes.changed):
        result[w.uid] = w
    assert result == {w.uid: w for w in new}


def test_pod_network_of_a_workload() -> None:
    net = PodNetwork.of(workload("u1", ip="198.18.0.7"))
    assert net == PodNetwork("u1", "demo/u1", "/run/netns/x", "198.18.0.7")
    assert PodNetwork.of(workload("u1"), "/proc/1/ns/net").netns_path == "/proc/1/ns/net"


def test_pod_network_needs_a_namespace_and_an_ip() -> None:
    with pytest.raises(RedirectError, match="pod demo/u1: no network namespace"):
        PodNetwork.of(workload("u1", netns=""))
    with pytest.raises(RedirectError, match="pod demo/u1: the pod has no IP"):
        PodNetwork.of(workload("u1", ip=""))


def test_redirect_errors_are_os_errors_naming_pod_and_namespace() -> None:
    err = RedirectError(PodNetwork("u", "demo/a", "/run/netns/a", "198.18.0.1"), "it broke")
    assert isinstance(err, OSError)
    assert str(err) == "pod demo/a (netns /run/netns/a): it broke"
    assert err.pod_key == "demo/a"
