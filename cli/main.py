"""``egm-assist``: the command-line tool, the layer above the backend and the workers.

Each subcommand is a module of :mod:`egm.cli.commands` with a ``register(subparsers)`` function.
``main`` is where every command ends the same way: exit codes from :mod:`egm.cli.errors`, a bad flag
answered with that subcommand's usage, a bad setting (environment variable) in one line, and
SIGTERM handled as Ctrl-C is (commands that started processes stop them) except by the services
(``serve``, ``worker``), which handle it themselves (a warm shutdown).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from egm.cli.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, Terminated, fail

#: subcommand modules, in the order ``--help`` lists them.
COMMANDS = ["demo", "serve", "worker", "prelabel", "status", "retry", "cancel", "next", "export", "parse",
            "build_tiny_model", "config"]
#: long-running services: they own SIGTERM (warm shutdown) and log JSON lines by default.
SERVICES = {"serve", "worker"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egm-assist",
                                     description="Pre-annotate images with EGM for Label Studio.",
                                     epilog="Run 'egm-assist COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"egm.cli.commands.{name}").register(sub)
    parser.subcommands = sub.choices  # type: ignore[attr-defined]
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; an unknown flag after a subcommand gets that subcommand's usage."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command not in SERVICES:
        signal.signal(signal.SIGTERM, _terminate)
    from pydantic import ValidationError

    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValidationError as exc:  # a setting (environment variable) with a value it cannot take
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or exc.title
        return fail(f"bad setting {where}: {first.get('msg', exc)} (see egm-assist config --markdown)", EXIT_USAGE)
