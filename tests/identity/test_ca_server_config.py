from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from identity.ca_server import CaServerConfig

pytestmark = pytest.mark.unit


def test_defaults_are_the_documented_ones() -> None:
    config = CaServerConfig()
    assert (config.host, config.port, config.lifetime, config.trust_domain) == (
        "127.0.0.1", 15012, timedelta(hours=24), "cluster.local")


@pytest.mark.parametrize(("setting", "value"), [
    ("host", "localhost"),
    ("host", "10.0.0.300"),
    ("port", 70000),
    ("port", -1),
    ("lifetime", timedelta(seconds=10)),
    ("lifetime", timedelta(days=365)),
    ("trust_domain", "Bad Domain"),
    ("request_timeout", 0),
])
def test_invalid_settings_are_named(setting: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^CaServerConfig\.{setting}: "):
        CaServerConfig(**{setting: value})


def test_ipv6_host_is_accepted() -> None:
    assert CaServerConfig(host="::1").host == "::1"
