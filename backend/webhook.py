"""``POST /webhook``: Label Studio's annotation events keep the correction figures current.

Label Studio waits at most ``WEBHOOK_TIMEOUT`` (1 s) for the answer, and measuring an
annotation may need its parent prediction from Label Studio (the webhook's task payload
has none). So the route only counts the event and hands it to one background thread
(events are applied in arrival order); :mod:`egm.export.live` does the work.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

import redis

from egm.backend.models import WebhookEvent
from egm.config.settings import Settings
from egm.export.live import LiveCorrections
from egm.stats import StatsStore

log = logging.getLogger(__name__)

ANNOTATION_ACTIONS = {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
#: Label Studio calls made to fetch a parent prediction (off the request thread).
FETCH_TIMEOUT_S = 10.0


class WebhookHandler:
    def __init__(self, settings: Settings, connection: redis.Redis, fetch_prediction=None,
                 background: bool = True) -> None:
        self.settings = settings
        self.stats = StatsStore(connection, settings.queue_prefix)
        self._client = None
        self._client_lock = threading.Lock()
        self.live = LiveCorrections(connection, settings.queue_prefix,
                                    fetch_prediction=fetch_prediction or self._fetch_prediction)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="egm-webhook") if background else None
        self._pending: set[Future] = set()
        self._pending_lock = threading.Lock()

    def handle(self, event: WebhookEvent) -> dict:
        if event.action in ANNOTATION_ACTIONS:
            self.stats.incr("egm_annotation_events_total", action=event.action)
            self._submit(event.model_dump())
        log.info("webhook", extra={"action": event.action})
        return {"status": "ok", "action": event.action}

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every event received so far is applied; True when none is left."""
        with self._pending_lock:
            pending = list(self._pending)
        _, not_done = wait(pending, timeout=timeout_s)
        return not not_done

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._client is not None:
            self._client.close()

    def _submit(self, event: dict) -> None:
        if self._executor is None:
            self._record(event)
            return
        future = self._executor.submit(self._record, event)
        with self._pending_lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _forget(self, future: Future) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def _record(self, event: dict) -> None:
        try:
            outcome = self.live.handle(event)
            log.info("correction figures", extra={"action": event.get("action"), "outcome": outcome})
        except Exception:  # noqa: BLE001 - one odd event must not stop the thread
            log.exception("correction figures failed", extra={"action": event.get("action")})

    def _fetch_prediction(self, prediction_id: int):
        client = self._label_studio()
        if client is None:
            return None
        return client.get_prediction(prediction_id)

    def _label_studio(self):
        if self.settings.label_studio_api_key is None:
            return None
        with self._client_lock:
            if self._client is None:
                from egm.labelstudio import LabelStudioClient

                self._client = LabelStudioClient.from_settings(self.settings, timeout_s=FETCH_TIMEOUT_S, retries=1)
            return self._client
