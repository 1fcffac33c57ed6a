"""Properties of the string matchers, IP blocks and ports, against independent references."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.matchers import MatchKind, StringPattern, parse_address, parse_ip_block, parse_port

pytestmark = pytest.mark.unit

# Small alphabets so that prefixes, suffixes and stars collide often.
texts = st.text(alphabet="ab/.*", max_size=8)
values = st.text(alphabet="ab/.", max_size=8)


def istio_glob(pattern: str, value: str) -> bool:
    """Istio's four match kinds, as a regular expression over the whole value."""
    if pattern == "*":
        regex = ".+"
    elif pattern.startswith("*"):
        regex = ".*" + re.escape(pattern[1:])
    elif pattern.endswith("*"):
        regex = re.escape(pattern[:-1]) + ".*"
    else:
        regex = re.escape(pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


@given(texts, values)
def test_string_pattern_agrees_with_a_regex(pattern: str, value: str) -> None:
    assert StringPattern.parse(pattern).matches(value) == istio_glob(pattern, value)


@given(values.filter(bool), values)
def test_prefix_and_suffix_match_their_extensions(stem: str, rest: str) -> None:
    assert StringPattern.parse(stem + "*").matches(stem + rest)
    assert StringPattern.parse("*" + stem).matches(rest + stem)


@given(values, values)
def test_exact_matches_only_itself(pattern: str, value: str) -> None:
    matcher = StringPattern.parse(pattern)
    assert matcher.kind is MatchKind.EXACT
    assert matcher.matches(value) == (pattern == value)


@given(texts)
def test_absent_values_never_match_and_patterns_print_back(pattern: str) -> None:
    matcher = StringPattern.parse(pattern)
    assert not matcher.matches(None)
    assert str(matcher) == pattern


def test_presence_needs_a_value() -> None:
    assert StringPattern.parse("*").matches("x")
    assert not StringPattern.parse("*").matches("")


ipv4 = st.integers(min_value=0, max_value=2**32 - 1)
ipv6 = st.integers(min_value=0, max_value=2**128 - 1)


def contains_by_bits(network: int, prefix: int, address: int, width: int) -> bool:
    shift = width - prefix
    return network >> shift == address >> shift


@given(ipv4, st.integers(min_value=0, max_value=32), ipv4)
def test_ipv4_cidr_membership_is_prefix_equality(network: int, prefix: int, address: int) -> None:
    text = f"{ipaddress.IPv4Address(network)}/{prefix}"  # host bits allowed, as in Istio
    block = parse_ip_block(text)
    assert block is not None
    assert (ipaddress.IPv4Address(address) in block) == contains_by_bits(network, prefix,
                                                                         address, 32)


@given(ipv6, st.integers(min_value=0, max_value=128), ipv6)
def test_ipv6_cidr_membership_is_prefix_equality(network: int, prefix: int, address: int) -> None:
    block = parse_ip_block(f"{ipaddress.IPv6Address(network)}/{prefix}")
    assert block is not None
    assert (ipaddress.IPv6Address(address) in block) == contains_by_bits(network, prefix,
                                                                         address, 128)


@given(ipv4, ipv4)
def test_a_single_address_is_a_block_of_one(address: int, other: int) -> None:
    block = parse_ip_block(str(ipaddress.IPv4Address(address)))
    assert block is not None
    assert (ipaddress.IPv4Address(other) in block) == (address == other)


@given(ipv4, ipv6)
def test_families_never_mix(v4: int, v6: int) -> None:
    block4 = parse_ip_block(f"{ipaddress.IPv4Address(v4)}/0")
    block6 = parse_ip_block(f"{ipaddress.IPv6Address(v6)}/0")
    assert block4 is not None and block6 is not None
    assert ipaddress.IPv6Address(v6) not in block4
    assert ipaddress.IPv4Address(v4) not in block6


@given(st.text(alphabet="0123456789abcdef.:/% ", max_size=20))
def test_ip_blocks_accept_no_more_than_ipaddress_does(text: str) -> None:
    block = parse_ip_block(text)
    if block is not None:
        assert block == ipaddress.ip_network(text if "/" in text else ipaddress.ip_address(text),
                                             strict=False)


@pytest.mark.parametrize("text", ["10.0.0.0/255.0.0.0", "10.0.0.0/08", " 10.0.0.1", "10.0.0.1/",
                                  "fe80::1%eth0", "10.0.0.300", "10.0.0.0/33", "", "010.0.0.1"])
def test_ip_blocks_rejected_like_go(text: str) -> None:
    assert parse_ip_block(text) is None


@given(ipv4)
def test_v4_mapped_peers_read_as_ipv4(address: int) -> None:
    v4 = ipaddress.IPv4Address(address)
    assert parse_address(f"::ffff:{v4}") == v4


@given(st.integers(min_value=0, max_value=99999))
def test_ports_are_decimal_up_to_65535(port: int) -> None:
    assert parse_port(str(port)) == (port if port <= 65535 else None)


@given(st.text(max_size=7))
def test_ports_take_digits_only(text: str) -> None:
    port = parse_port(text)
    if port is not None:
        assert text.isascii() and text.isdigit() and int(text) == port
