"""The node agent's settings: parsed once from the command line, validated, logged."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tunnel.config import ConfigError, ProxyConfig

REDIRECT_MODES = ("iptables", "ebpf")


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
    workloads_file: Path | None  # required with source "file"
    # The CA, for the proxy's certificates: required wherever the proxy runs (not
    # by an agent whose proxy is another process).
    ca_url: str = ""
    ca_root: Path | None = None
    token_file: Path | None = None
    # "agent": `trellis agent run`; "proxy": `trellis proxy run`.
    role: str = "agent"
    # The agent↔proxy control socket: the proxy listens on it; an agent with one
    # drives that proxy, an agent without one runs the proxy in its own process.
    control_socket: Path | None = None
    metrics_address: tuple[str, int] = ("127.0.0.1", 15020)
    readiness_address: tuple[str, int] = ("0.0.0.0", 15021)
    redirect: str = "iptables"
    # eBPF mode: where its maps and links are pinned; "" = /sys/fs/bpf/trellis/<node>.
    bpf_root: str = ""
    # eBPF mode on a host that cannot do it: "" stops the agent, "iptables" falls back.
    redirect_fallback: str = ""
    root_namespace: str = "trellis-system"
    # Istio's root namespace: security.istio.io policies there apply mesh-wide.
    istio_root_namespace: str = "istio-system"
    # Leave to Istio ambient what it manages (nodeagent/istio_coexist.py).
    istio_coexistence: bool = True
    cert_fetch_timeout_s: float = 10.0
    reconcile_interval_s: float = 1.0
    # Unix socket for the trellis-cni plugin (nodeagent/cni_server.py); None: no CNI hook.
    cni_socket: Path | None = None
    # On SIGTERM, wait this long for live connections to end (0: stop at once).
    drain_s: float = 0.0
    source: str = "file"  # "file" (--workloads) or "kubernetes" (the API server)
    kubeconfig: Path | None = None  # None: in-cluster config, else the default kubeconfig
    # Cap of the exponential backoff while the API server is unreachable.
    k8s_backoff_max_s: float = 10.0
    # The node's network namespace, where kubelet probes to enrolled pods are SNATed
    # (nodeagent/host_probe.py): the agent's own by default (lab, VM); the chart's
    # agent, in a pod of its own, names the host's (/proc/1/ns/net). "": not at all.
    host_netns: str = "/proc/self/ns/net"

    def __post_init__(self) -> None:
        if self.role not in ("agent", "proxy"):
            raise ConfigError(f"role: {self.role!r} is not 'agent' or 'proxy'")
        if self.role == "proxy" and self.control_socket is None:
            raise ConfigError("control_socket: required for the proxy (--control-socket)")
        if self.control_socket is not None and not self.control_socket.is_absolute():
            raise ConfigError(f"control_socket: {str(self.control_socket)!r} is not an "
                              "absolute path")
        if self.runs_proxy:
            self._check_ca()
        if self.source not in ("file", "kubernetes"):
            raise ConfigError(f"source: {self.source!r} is not one of ('file', 'kubernetes')")
        if self.source == "file" and self.workloads_file is None:
            raise ConfigError("workloads_file: required with source 'file' (--workloads)")
        if self.kubeconfig is not None and not self.kubeconfig.is_file():
            raise ConfigError(f"kubeconfig: {str(self.kubeconfig)!r} is not a readable file")
        if not 0.5 <= self.k8s_backoff_max_s <= 300:
            raise ConfigError(f"k8s_backoff_max_s: {self.k8s_backoff_max_s!r} is not "
                              "between 0.5 and 300 seconds")
        if self.redirect not in REDIRECT_MODES:
            raise ConfigError(f"redirect: {self.redirect!r} is not one of {REDIRECT_MODES}")
        if self.redirect_fallback not in ("", "iptables"):
            raise ConfigError(f"redirect_fallback: {self.redirect_fallback!r} is not "
                              "'iptables' or empty")
        if self.bpf_root and not self.bpf_root.startswith("/sys/fs/bpf/"):
            raise ConfigError(f"bpf_root: {self.bpf_root!r} is not under /sys/fs/bpf/")
        if self.drain_s < 0:
            raise ConfigError(f"drain_s: {self.drain_s} is negative")
        if self.host_netns and not self.host_netns.startswith("/"):
            raise ConfigError(f"host_netns: {self.host_netns!r} is not an absolute path")
        if self.cni_socket is not None and not self.cni_socket.is_absolute():
            raise ConfigError(f"cni_socket: {str(self.cni_socket)!r} is not an absolute path")

    def _check_ca(self) -> None:
        url = urlsplit(self.ca_url)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(f"ca_url: {self.ca_url!r} must be an https:// URL (--ca-url)")
        for setting, path in (("ca_root", self.ca_root), ("token_file", self.token_file)):
            if path is None:
                raise ConfigError(f"{setting}: required where the proxy runs "
                                  f"(--{setting.replace('_', '-')})")
            if not path.is_file():
                raise ConfigError(f"{setting}: {str(path)!r} is not a readable file")

    @property
    def runs_proxy(self) -> bool:
        """Whether this process runs the node proxy (and so needs certificates)."""
        return self.role == "proxy" or self.control_socket is None

    @property
    def node(self) -> str:
        return self.proxy.node

    @property
    def effective_bpf_root(self) -> str:
        return self.bpf_root or f"/sys/fs/bpf/trellis/{self.node}"

    def as_log_fields(self) -> dict[str, object]:
        """Logged once at start; the proxy's settings, every one, under ``proxy``."""
        return {
            "proxy": self.proxy.as_dict(),
            "node": self.node, "source": self.source,
            "workloads_file": str(self.workloads_file or ""),
            "kubeconfig": str(self.kubeconfig or ""),
            "ca_url": self.ca_url, "trust_domain": self.proxy.trust_domain,
            "metrics": "{}:{}".format(*self.metrics_address),
            "readiness": "{}:{}".format(*self.readiness_address), "redirect": self.redirect,
            "root_namespace": self.root_namespace, "bpf_root": self.effective_bpf_root,
            "istio_root_namespace": self.istio_root_namespace,
            "istio_coexistence": self.istio_coexistence,
            "cni_socket": str(self.cni_socket) if self.cni_socket else "",
            "drain_s": self.drain_s, "role": self.role,
            "control_socket": str(self.control_socket or ""),
            "host_netns": self.host_netns,
        }
