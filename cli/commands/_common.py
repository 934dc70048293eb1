"""Helpers shared by subcommands: settings from the environment and the flags, logging setup."""

from __future__ import annotations

from egm.config.settings import Settings, reload_settings, use_settings
from egm.logs import configure_logging


def settings_from_flags(*, service: bool = False, **env: object) -> Settings:
    """Flags win over the environment: one ``Settings`` with the flags as overrides (named as the
    variables they replace), installed for this process; ``os.environ`` is left as it is, and the
    processes a command starts get ``settings.environment()``. ``service``: a long-running service
    (serve, worker) logs JSON lines unless EGM_LOG_FORMAT says otherwise."""
    settings = use_settings(reload_settings().with_overrides(**env))
    configure_logging(settings, service=service)
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
    parser.add_argument("--no-wait", action="store_true", help="enqueue and return; follow the run with 'egm-assist status RUN --watch'")
    parser.add_argument("--timeout", type=float, help="stop following after this many seconds (the run goes on)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def step_printer(what: str, every_s: float = 10.0, stream=None):
    """A ``progress(done, total)`` callback for long steps: prints ``what: done/total, elapsed, ~left`` at
    most every ``every_s`` seconds (and at the end), so a slow machine shows it is working."""
    import sys
    import time

    stream = stream or sys.stdout
    started = time.monotonic()
    last = [started]
    first: list[float] = []  # when the first step ended: the rate is measured after it (warm-up)

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        tail = ""
        if 1 < done < total:
            left = (now - first[0]) / (done - 1) * (total - done)
            tail = f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        print(f"  {what}: {done}/{total} ({now - started:.0f} s{tail})", file=stream, flush=True)

    return progress
