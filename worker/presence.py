"""This worker's record in the fleet registry (:mod:`egm.fleet`), kept alive by its own thread.

The thread beats every ``EGM_HEARTBEAT_S`` from the moment Redis answers until the process
ends, through model loading, idle waits and long batches alike, so a record that expires means
the worker is gone. ``failed`` records carry the start-up error for whoever started the worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis

from egm.fleet import Fleet, WorkerRecord, WorkerState
from egm.identity import ModelIdentity

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, fleet: Fleet, name: str, engine: str) -> None:
        self.fleet = fleet
        self.record = WorkerRecord(worker=name, state=WorkerState.starting, engine=engine,
                                   host=socket.gethostname(), pid=os.getpid(), started_at=time.time())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> "Presence":
        """Publish ``starting`` (raises if Redis does not answer) and start beating."""
        self.fleet.publish(self.record)
        self._thread = threading.Thread(target=self._beat, name="egm-presence", daemon=True)
        self._thread.start()
        return self

    def ready(self, identity: ModelIdentity) -> None:
        with self._lock:
            self.record = self.record.model_copy(update={
                "state": WorkerState.ready, "ready_at": time.time(), "model_version": identity.model_version,
                "identity": identity.summary(), "prompts": identity.prompts, "reason": None})
            self.fleet.publish(self.record)

    def failed(self, reason: str) -> None:
        """Stop beating and leave the reason behind (kept a few minutes)."""
        self._halt()
        with self._lock:
            self.record = self.record.model_copy(update={"state": WorkerState.failed, "reason": reason[:1000]})
            try:
                self.fleet.publish(self.record)
            except redis.RedisError:
                log.warning("could not publish the start-up failure", exc_info=True)

    def stop(self) -> None:
        """Clean exit: the record goes at once (a failed one stays for its reader)."""
        self._halt()
        if self.record.state == WorkerState.failed:
            return
        try:
            self.fleet.remove(self.record.worker)
        except redis.RedisError:
            pass  # it expires on its own

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.fleet.heartbeat_s):
            try:
                with self._lock:
                    if not self._stop.is_set():
                        self.fleet.publish(self.record)
            except Exception:  # noqa: BLE001 - Redis away: the next beat retries
                log.warning("fleet heartbeat failed", exc_info=True)
