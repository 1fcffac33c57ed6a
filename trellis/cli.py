"""`trellis`: gathers each package's subcommands under one command.

Each package that offers commands has a ``cli.py`` with ``register(subparsers)``;
every subcommand sets ``func(args) -> int``. A subcommand turns the errors a user
can cause into one line on stderr and exit status 2; this dispatcher adds nothing
but the routing, so a package's commands stay testable on their own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from trellis import logging as trellis_logging

# Order is the order `trellis --help` lists them.
COMMAND_MODULES = (
    "lab.cli",
    "nodeagent.cli",
    "policy.cli",
    "bench.cli",
)
# The packages the image leaves out (deploy/Dockerfile copies neither): only
# their absence is skipped. Any other missing module, a typo in the list above
# included, is an error at start-up.
OPTIONAL_PACKAGES = frozenset({"lab", "bench"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trellis", description="Trellis: a sidecarless service mesh.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A package the image leaves out is skipped; a missing command module
            # of a package that is there, or a missing dependency, is an error.
            package = name.partition(".")[0]
            if package in OPTIONAL_PACKAGES and exc.name == package:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JSON lines on stderr for every command; quiet (warnings) unless a
    # long-running command raises its level with --log-level.
    trellis_logging.install("warning")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `trellis lab status | head`: the reader left; that is not an error.
        # Point stdout at devnull so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
