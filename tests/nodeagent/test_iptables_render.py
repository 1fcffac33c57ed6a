"""The rendered rule text, compared with golden files (TRELLIS_UPDATE_GOLDEN=1 rewrites them).

Inputs named *.save are real ``iptables-save`` output captured from namespaces:
``applied.save`` after one apply, ``partial.save`` the same with the mangle
PREROUTING jump missing, ``mixed.save`` (with counters, ``-c``) after another
tool added its own chain, a jump above ours and a comment that mentions ours.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.iptables import (
    _explain,
    render_apply,
    render_jumps,
    render_removal,
    render_rules,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
POD_IP = "198.18.0.5"


def _save(name: str) -> str:
    return (GOLDEN / name).read_text()


CASES: dict[str, Callable[[], str]] = {
    "rules.golden": lambda: render_rules(POD_IP),
    "apply_fresh.golden": lambda: render_apply(POD_IP, ""),
    "apply_again.golden": lambda: render_apply(POD_IP, _save("applied.save")),
    "apply_partial.golden": lambda: render_apply(POD_IP, _save("partial.save")),
    "jumps_fresh.golden": lambda: render_jumps(""),
    "jumps_partial.golden": lambda: render_jumps(_save("partial.save")),
    "removal.golden": lambda: render_removal(_save("applied.save")),
    "removal_mixed.golden": lambda: render_removal(_save("mixed.save")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden_file(name: str) -> None:
    text = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("TRELLIS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with TRELLIS_UPDATE_GOLDEN=1 if meant"


def test_jumps_already_present_render_nothing() -> None:
    assert render_jumps(_save("applied.save")) == ""
    assert render_jumps(_save("mixed.save")) == ""


def test_nothing_to_remove_renders_nothing() -> None:
    assert render_removal("") == ""
    assert render_removal("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j OTHER\nCOMMIT\n") == ""


def test_rules_are_in_the_form_iptables_save_prints_them() -> None:
    """So a save after an apply can be compared line by line with what we rendered."""
    rendered = {line for line in render_rules(POD_IP).splitlines() if line.startswith("-A ")}
    saved = {line for line in _save("applied.save").splitlines()
             if line.startswith("-A TRELLIS_")}
    assert rendered == saved


def test_removal_keeps_other_rules_even_when_they_mention_ours() -> None:
    removal = render_removal(_save("mixed.save"))
    assert "OTHER_CNI" not in removal
    assert "comment" not in removal


def test_a_bad_pod_ip_is_named() -> None:
    with pytest.raises(ValueError, match=r"pod IP '1\.2\.3' is not an IPv4 address"):
        render_rules("1.2.3")


@given(st.ip_addresses(v=4))
def test_only_the_pod_ip_lines_depend_on_the_pod(ip: ipaddress.IPv4Address) -> None:
    """The pod's own IP appears twice: its traffic to itself, and the only destination
    a kubelet probe may reach around the proxy."""
    ours, reference = render_rules(str(ip)), render_rules(POD_IP)
    assert ours.count(f"-d {ip}/32 ") == 2
    assert ours.replace(f"-d {ip}/32 ", "-d X ") == reference.replace(f"-d {POD_IP}/32 ", "-d X ")


def test_the_probe_exception_names_the_pod_and_spares_the_proxy_ports() -> None:
    (probe,) = [line for line in render_rules(POD_IP).splitlines() if "169.254.7.127" in line]
    assert probe.startswith(f"-A TRELLIS_PRERT -s 169.254.7.127/32 -d {POD_IP}/32 -p tcp")
    assert "! --dports 15001,15006,15008" in probe


def test_restore_errors_quote_the_failing_line() -> None:
    stderr = ("iptables-restore v1.8.9 (nf_tables): unknown option \"--bogus\"\n"
              "Error occurred at line: 2\n")
    message = _explain(stderr, "*nat\n-A X --bogus\nCOMMIT\n")
    assert message.endswith("[input line 2: -A X --bogus]")
    assert "unknown option" in message
