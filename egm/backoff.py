"""Exponential backoff: the one formula every retry loop uses.

Retry number ``attempt`` (1 = the first retry) waits ``base_s * 2**(attempt - 1)``
seconds, at most ``cap_s``. With ``jitter`` (a fraction in [0, 1]) the delay is lowered
by up to that fraction at random, so that many clients that failed together do not retry
in step. Used by the Label Studio client, the OpenAI-compatible engine, bulk-run task
retries, the worker's wait for Label Studio and its wait for Redis.
"""

from __future__ import annotations

import random
from typing import Callable

#: 2**60 times any sensible base is past every cap; larger exponents would overflow a float.
_MAX_EXPONENT = 60


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float = 0.0,
              rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (see module doc)."""
    delay = min(cap_s, base_s * 2.0 ** min(_MAX_EXPONENT, max(0, attempt - 1)))
    return delay * (1.0 - min(1.0, max(0.0, jitter)) * rng()) if jitter else delay
