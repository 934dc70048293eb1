"""Helpers shared by subcommands: environment overrides from flags, logging setup."""

from __future__ import annotations

import os

from egm.config.settings import Settings, reload_settings
from egm.logs import configure_logging


def settings_from_flags(**env: object) -> Settings:
    """Flags win over the environment: write them as variables, then read the settings once."""
    for name, value in env.items():
        if value is not None:
            os.environ[name] = str(value)
    settings = reload_settings()
    configure_logging(settings)
    return settings


def open_runs(**env: object):
    """Settings, a queue client and the run store, for the commands that inspect bulk runs."""
    from egm.queue import QueueClient
    from egm.bulk.run_store import RunStore

    settings = settings_from_flags(**env)
    queue = QueueClient(settings)
    return settings, queue, RunStore(queue.redis, queue.prefix)


def add_follow_args(parser) -> None:
    """Options of the commands that enqueue a bulk run and follow it."""
    parser.add_argument("--no-wait", action="store_true", help="enqueue and return; follow with `status RUN --watch`")
    parser.add_argument("--timeout", type=float, help="stop following after this many seconds (the run goes on)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
