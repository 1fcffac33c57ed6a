"""The node agent's settings: parsed once from the command line, validated, logged."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tunnel.config import ConfigError, ProxyConfig

REDIRECT_MODES = ("iptables",)


def parse_hostport(value: str, setting: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{setting}: {value!r} is not HOST:PORT")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"{setting}: {host!r} is not an IPv4 address") from None
    return host, int(port)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    proxy: ProxyConfig
    workloads_file: Path
    ca_url: str
    ca_root: Path
    token_file: Path
    metrics_address: tuple[str, int] = ("127.0.0.1", 15020)
    readiness_address: tuple[str, int] = ("0.0.0.0", 15021)
    redirect: str = "iptables"
    root_namespace: str = "trellis-system"
    cert_fetch_timeout_s: float = 10.0
    reconcile_interval_s: float = 1.0

    def __post_init__(self) -> None:
        url = urlsplit(self.ca_url)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(f"ca_url: {self.ca_url!r} must be an https:// URL")
        if self.redirect not in REDIRECT_MODES:
            raise ConfigError(f"redirect: {self.redirect!r} is not one of {REDIRECT_MODES}")
        for setting, path in (("ca_root", self.ca_root), ("token_file", self.token_file)):
            if not path.is_file():
                raise ConfigError(f"{setting}: {str(path)!r} is not a readable file")

    @property
    def node(self) -> str:
        return self.proxy.node

    def as_log_fields(self) -> dict[str, object]:
        return {
            "node": self.node, "workloads_file": str(self.workloads_file),
            "ca_url": self.ca_url, "trust_domain": self.proxy.trust_domain,
            "metrics": "{}:{}".format(*self.metrics_address),
            "readiness": "{}:{}".format(*self.readiness_address), "redirect": self.redirect,
            "root_namespace": self.root_namespace,
        }
