"""Exit codes and one-line errors: every command ends with one of these codes, and a failure is one line.

The exit-code table (the README's command-line section shows the same):

====  ==================  =================================================================
code  name                meaning
====  ==================  =================================================================
0     EXIT_OK             done
1     EXIT_ERROR          failed: a service unreachable, a worker died, an unparseable answer
2     EXIT_USAGE          bad flags or input, or missing configuration (the Label Studio key)
3     EXIT_FAILED_TASKS   a bulk run ended with failed tasks (listed; ``retry RUN``)
4     EXIT_NOT_DONE       a bulk run is not finished (``--timeout``, cancelled); it goes on
130   EXIT_INTERRUPTED    Ctrl-C
143   EXIT_TERMINATED     SIGTERM (cleaned up as after Ctrl-C)
====  ==================  =================================================================

:func:`service_errors` turns the errors of unreachable services into one line; :func:`missing_key`
is the one message (and code) for a missing Label Studio key.
"""

from __future__ import annotations

import functools
import sys

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
#: missing configuration is a usage error: the user fixes it with a flag or a variable.
EXIT_CONFIG = EXIT_USAGE
EXIT_FAILED_TASKS = 3
EXIT_NOT_DONE = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so commands clean up their processes the same way."""


def fail(message: str, code: int = EXIT_ERROR) -> int:
    """Print ``error: message`` on one line of stderr and return ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def missing_key(what: str = "this command") -> int:
    return fail(f"{what} needs Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                f"(or pass --ls-url and --ls-key)", EXIT_CONFIG)


def service_errors(func):
    """A command that cannot reach Redis or Label Studio says so in one line, not a traceback."""

    @functools.wraps(func)
    def wrapper(args) -> int:
        import redis

        from egm.labelstudio import LabelStudioError

        try:
            return func(args)
        except redis.exceptions.ConnectionError as exc:
            from egm.config.settings import get_settings
            from egm.redaction import redact

            return fail(f"cannot reach Redis at {redact(get_settings().redis_url)} ({exc}); set REDIS_URL")
        except LabelStudioError as exc:
            return fail(str(exc))

    return wrapper
