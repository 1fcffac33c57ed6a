from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509

from identity.ca import CertificateAuthority, service_dns_names
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


def test_serving_certificate_names_the_service_and_no_wildcard_address() -> None:
    # The CA listens on 0.0.0.0 in its pod; proxies dial the Service's name.
    ca = CertificateAuthority.create()
    names = service_dns_names("trellis-ca", "trellis-system", "cluster.local")
    credentials = ca.issue_server_credentials(["0.0.0.0", "::", "10.0.0.5", *names])
    cert = x509.load_pem_x509_certificate(credentials.chain_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "trellis-ca", "trellis-ca.trellis-system", "trellis-ca.trellis-system.svc",
        "trellis-ca.trellis-system.svc.cluster.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize(("parts", "bad"), [
    (("Trellis_CA", "ns", "cluster.local"), "service name 'Trellis_CA'"),
    (("ca", "-ns", "cluster.local"), "service namespace '-ns'"),
    (("ca", "ns", "cluster..local"), "cluster domain 'cluster..local'"),
])
def test_service_names_are_checked(parts: tuple[str, str, str], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        service_dns_names(*parts)
