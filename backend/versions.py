"""Which ``model_version`` the backend reports and plans with: the live workers' (egm.fleet), never its own.

Read from the fleet registry on every call (one Redis round trip), so a rolling upgrade moves
``/setup``, ``/health`` and new ``/predict`` jobs to the new model as soon as its first worker is
ready. One place, so whatever Label Studio is told about versions is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from egm.config.settings import Settings
from egm.fleet import Fleet, FleetError
from egm.redaction import redact
from egm.queue import QueueClient


@dataclass
class FleetHealth:
    model_version: str | None
    workers: int
    #: why there is no model_version (no live worker, Redis unreachable), else None.
    detail: str | None = None
    #: False when the queue (Redis) is unreachable: /health answers 503 DOWN, so Label Studio's
    #: connection check fails with the reason. No live worker is not DOWN: workers come and go.
    up: bool = True


class VersionSource:
    def __init__(self, settings: Settings, queue: QueueClient) -> None:
        self.settings = settings
        self.fleet = Fleet.from_settings(settings, queue.redis)

    def for_planning(self) -> str:
        """The version new jobs are planned for; :class:`FleetError` (a 503) when no worker can take them."""
        return self.fleet.version_for_planning(self.settings)

    def health(self) -> FleetHealth:
        try:
            view = self.fleet.view()
        except redis.RedisError as exc:
            return FleetHealth(None, 0, f"queue unreachable: Redis at {redact(self.settings.redis_url)} does not "
                                        f"answer ({type(exc).__name__}); start it or fix REDIS_URL", up=False)
        try:
            return FleetHealth(view.current_version(), len(view.ready))
        except FleetError as exc:
            return FleetHealth(None, 0, str(exc))
