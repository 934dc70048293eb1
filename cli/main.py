"""``egm-assist``: the command-line tool, the layer above the backend and the workers.

Each subcommand is a module of :mod:`egm.cli.commands` with a ``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["demo", "serve", "worker", "prelabel", "status", "retry", "cancel", "next", "export", "parse",
            "build_tiny_model", "config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egm-assist",
                                     description="Pre-annotate images with EGM for Label Studio.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"egm.cli.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


