"""``POST /webhook``: Label Studio's annotation events keep the correction figures current."""

from __future__ import annotations

import logging

import redis

from backend.models import WebhookEvent
from config.settings import Settings
from egm.stats import StatsStore

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}


class WebhookHandler:
    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.stats = StatsStore(connection, settings.queue_prefix)

    def handle(self, event: WebhookEvent) -> dict:
        if event.action in ANNOTATION_ACTIONS:
            self.stats.incr("egm_annotation_events_total", action=event.action)
            self._record_corrections(event)
        log.info("webhook", extra={"action": event.action})
        return {"status": "ok", "action": event.action}

    def _record_corrections(self, event: WebhookEvent) -> None:
        """Hook for the correction analysis (accepted / moved / relabeled / added / deleted)."""
        try:
            from egm.corrections import record_webhook_event
        except ImportError:
            return
        record_webhook_event(self.stats, event.model_dump())
