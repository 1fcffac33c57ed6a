"""`trellis cni install`: keep the trellis-cni plugin chained on this node (install.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from nodeagent.cni.install import (
    BUILT_PLUGIN,
    ChainKeeper,
    InstallSettings,
    remove,
    run,
)
from nodeagent.cni.lifecycle import DaemonSetRef
from nodeagent.cni.spec import DEFAULT_SOCKET, DEFAULT_TIMEOUT_S

IMAGE_PLUGIN = Path("/opt/trellis/trellis-cni")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cni = subparsers.add_parser("cni", help="the chained CNI plugin on this node")
    cni_sub = cni.add_subparsers(dest="cni_command", metavar="COMMAND", required=True)
    install = cni_sub.add_parser(
        "install", help="copy trellis-cni to the host and keep it chained into the CNI "
                        "configuration until stopped; on SIGTERM, remove it only if the "
                        "owner DaemonSet is gone (an uninstall)")
    install.add_argument("--binary", type=Path,
                         default=IMAGE_PLUGIN if IMAGE_PLUGIN.exists() else BUILT_PLUGIN,
                         help="the plugin to install (default: the image's, else build/)")
    install.add_argument("--bin-dir", type=Path, required=True)
    install.add_argument("--conf-dir", type=Path, required=True)
    install.add_argument("--agent-socket", default=DEFAULT_SOCKET,
                         help="the agent's CNI socket as the host sees it")
    install.add_argument("--timeout-seconds", type=float, default=DEFAULT_TIMEOUT_S)
    install.add_argument("--exclude-namespace", action="append", default=[],
                         help="pods here never wait for the agent (repeat; kube-system and "
                              "the agent's own namespace belong here)")
    install.add_argument("--ready-file", type=Path, default=None,
                         help="exists exactly while the plugin is chained (readiness probe)")
    install.add_argument("--fallback-file", type=Path, default=None,
                         help="the agent's fallback verdicts as this container sees them; "
                              "removed on an uninstall")
    install.add_argument("--interval", type=float, default=0.5,
                         help="seconds between checks of the CNI configuration")
    install.add_argument("--owner-daemonset", default=None, metavar="NAMESPACE/NAME",
                         help="on SIGTERM, uninstall only if this DaemonSet is gone")
    install.add_argument("--kubeconfig", type=Path, default=None)
    mode = install.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="install once and exit")
    mode.add_argument("--remove", action="store_true", help="undo an install and exit")
    install.set_defaults(func=_install)


def _fail(message: str) -> int:
    print(f"trellis cni install: error: {message}", file=sys.stderr)
    return 2


def _install(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.INFO)
    if args.remove:
        extra = (args.fallback_file,) if args.fallback_file else ()
        for path in remove(args.bin_dir, args.conf_dir, extra):
            print(f"trellis-cni removed: {path}")
        return 0
    entry = {"agentSocket": args.agent_socket, "timeoutSeconds": args.timeout_seconds,
             "excludeNamespaces": sorted(set(args.exclude_namespace))}
    try:
        owner = DaemonSetRef.parse(args.owner_daemonset) if args.owner_daemonset else None
        settings = InstallSettings(
            binary=args.binary, bin_dir=args.bin_dir, conf_dir=args.conf_dir, entry=entry,
            ready_file=args.ready_file, fallback_file=args.fallback_file,
            interval_s=args.interval, owner=owner, kubeconfig=args.kubeconfig)
    except ValueError as exc:
        return _fail(str(exc))
    if args.once:
        keeper = ChainKeeper(settings)
        return 0 if keeper.check() else _fail(keeper.problem)
    return asyncio.run(run(settings))
