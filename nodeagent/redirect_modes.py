"""Choosing the redirection mode: ``iptables`` or ``ebpf``, with an optional fallback.

An ``ebpf`` agent on a host that cannot do eBPF stops at start with one line
saying what is missing and what to change; only when the operator asked for a
fallback (``--redirect-fallback iptables``) does it run in iptables mode
instead, and says so in a warning.
"""

from __future__ import annotations

import logging

from nodeagent.config import REDIRECT_MODES
from nodeagent.redirect import Redirector
from tunnel.config import ConfigError

_log = logging.getLogger("trellis.nodeagent")



def make_redirector(mode: str, *, bpf_root: str, fallback: str = "") -> Redirector:
    from nodeagent.iptables import IptablesRedirector  # each mode imports its own

    if mode == "iptables":
        return IptablesRedirector()
    if mode != "ebpf":
        raise ConfigError(f"redirect: {mode!r} is not one of {REDIRECT_MODES}")
    from nodeagent.ebpf import EbpfRedirector
    from nodeagent.ebpf_support import EbpfUnavailable

    try:
        return EbpfRedirector(bpf_root)
    except EbpfUnavailable as exc:
        if fallback != "iptables":
            raise ConfigError(f"redirect: ebpf cannot work on this host: {exc}") from None
        _log.warning("eBPF redirection unavailable; falling back to iptables as configured",
                     extra={"fields": {"reason": str(exc)}})
        return IptablesRedirector()
