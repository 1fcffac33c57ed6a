"""The proxy's settings: one frozen value, validated once, logged at start."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from identity.spiffe import DEFAULT_TRUST_DOMAIN

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
# The mark on every socket the proxy opens inside a pod; the pod's rules let it
# pass unredirected (Istio uses the same value, so tooling recognises it).
PROXY_MARK = 0x539


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting."""


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    node: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster: str = "Kubernetes"
    connect_timeout_s: float = 5.0
    pool_idle_timeout_s: float = 300.0
    max_streams_per_connection: int = 100

    def __post_init__(self) -> None:
        if not self.node:
            raise ConfigError("node: must not be empty")
        if self.connect_timeout_s <= 0:
            raise ConfigError(f"connect_timeout_s: {self.connect_timeout_s} must be > 0")
        if self.pool_idle_timeout_s <= 0:
            raise ConfigError(f"pool_idle_timeout_s: {self.pool_idle_timeout_s} must be > 0")
        if not 1 <= self.max_streams_per_connection <= 1000:
            raise ConfigError("max_streams_per_connection: must be within 1..1000, "
                              f"got {self.max_streams_per_connection}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
