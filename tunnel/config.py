"""The proxy's settings: one frozen value, validated once, logged at start."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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
    # Limits (issue 10). Each one that bites is counted and logged at a bounded rate.
    # A connection is an accepted TCP connection on 15001/15006 or a CONNECT stream on
    # 15008, from accept until its relay ends; each holds up to two fds, so the node
    # limit also sizes RLIMIT_NOFILE (raised at start). The defaults admit the
    # 10,000-connection soak from one pod with room to spare.
    max_connections_per_node: int = 65536
    max_connections_per_pod: int = 16384
    # A relay that moved no byte either way for this long is closed; 0: never.
    # One hour, as Envoy's tcp_proxy idle_timeout.
    relay_idle_timeout_s: float = 3600.0
    # Write high-water mark of each relayed TCP socket: past it the relay stops reading
    # the other side, so one slow reader holds about this much of the proxy's memory.
    relay_write_high_water_bytes: int = 1024 * 1024
    # The proxy's ports outside the pods (metrics, readiness). With the three pod ports
    # they are never a connection's target: reaching one would loop through the proxy.
    admin_ports: tuple[int, ...] = (15020, 15021)
    # HBONE (15008) before authentication (tunnel/handshake_limit.py): a TLS handshake
    # must finish within this, and at most this many may be pending per pod listener
    # and on the node (an idle one holds ~45 KiB). Streams per connection (above) is
    # our SETTINGS_MAX_CONCURRENT_STREAMS, the in-flight CONNECT handlers' bound and
    # the pool's cap per outbound connection.
    hbone_handshake_timeout_s: float = 5.0
    max_pending_handshakes_per_listener: int = 128
    max_pending_handshakes_per_node: int = 512
    own_ports: frozenset[int] = field(init=False, repr=False, compare=False)

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
        self._check_limits()
        object.__setattr__(self, "own_ports", frozenset(
            (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT, *self.admin_ports)))

    def _check_limits(self) -> None:
        if not 1 <= self.max_connections_per_node <= 1_000_000:
            raise ConfigError("max_connections_per_node: must be within 1..1000000, "
                              f"got {self.max_connections_per_node}")
        if not 1 <= self.max_connections_per_pod <= self.max_connections_per_node:
            raise ConfigError("max_connections_per_pod: must be within 1..max_connections_"
                              f"per_node ({self.max_connections_per_node}), "
                              f"got {self.max_connections_per_pod}")
        idle = self.relay_idle_timeout_s
        if not (math.isfinite(idle) and 0 <= idle <= 7 * 86400):
            raise ConfigError(f"relay_idle_timeout_s: must be 0 (off) or up to 604800 s, "
                              f"got {idle}")
        if not 16 * 1024 <= self.relay_write_high_water_bytes <= 64 * 1024 * 1024:
            raise ConfigError("relay_write_high_water_bytes: must be within 16 KiB..64 MiB, "
                              f"got {self.relay_write_high_water_bytes}")
        for port in self.admin_ports:
            if not 1 <= port <= 65535:
                raise ConfigError(f"admin_ports: {port} is not a TCP port")
        self._check_handshake_limits()

    def _check_handshake_limits(self) -> None:
        timeout = self.hbone_handshake_timeout_s
        if not (math.isfinite(timeout) and 0 < timeout <= 60):
            raise ConfigError(f"hbone_handshake_timeout_s: must be within (0, 60] s, "
                              f"got {timeout}")
        if not 1 <= self.max_pending_handshakes_per_node <= 100_000:
            raise ConfigError("max_pending_handshakes_per_node: must be within 1..100000, "
                              f"got {self.max_pending_handshakes_per_node}")
        if not 1 <= self.max_pending_handshakes_per_listener \
                <= self.max_pending_handshakes_per_node:
            raise ConfigError("max_pending_handshakes_per_listener: must be within "
                              f"1..max_pending_handshakes_per_node "
                              f"({self.max_pending_handshakes_per_node}), "
                              f"got {self.max_pending_handshakes_per_listener}")

    def as_dict(self) -> dict[str, object]:
        values = asdict(self)
        values["own_ports"] = sorted(self.own_ports)
        return values
