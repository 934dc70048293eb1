"""``egm-assist``: the one command-line tool. Each subcommand lives in ``egm/commands/<name>.py``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["demo", "serve", "worker", "prelabel", "status", "retry", "cancel", "next", "export", "parse",
            "build_tiny_model", "config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egm-assist", description=__doc__.splitlines()[0].strip("`: "))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"egm.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"egm.commands.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
