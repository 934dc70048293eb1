"""One-line errors for the bulk commands when a service is unreachable (no traceback)."""

from __future__ import annotations

import functools
import sys

EXIT_ERROR = 1


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

            print(f"error: cannot reach Redis at {get_settings().redis_url} ({exc}); set REDIS_URL", file=sys.stderr)
            return EXIT_ERROR
        except LabelStudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return wrapper
