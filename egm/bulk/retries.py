"""Transient task failures of bulk runs come back later, with exponential backoff.

A task that failed for a reason that may pass (a transient :class:`egm.contract.ErrorKind`:
an image download error, an engine error for that request, Label Studio unavailable for
longer than the worker waits) is put into a new batch due ``backoff * 2**(attempt-1)``
seconds later (:mod:`egm.backoff`), up to ``EGM_TASK_RETRIES`` times; then it lands in the run's failed
list with its reason. Permanent failures (undecodable or blocked image, no
parseable box) fail at once.

Due batches wait in one Redis sorted set (score = due time) and are promoted to
the bulk queue by whoever passes by: every worker after each batch and the
``prelabel`` CLI while it follows the run. ``ZREM`` decides who promotes a batch,
so it is enqueued exactly once however many promoters race.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from egm.backoff import backoff_s
from egm.config.settings import Settings
from egm.contract import BatchJob, BatchResult, TaskResult, is_transient as kind_is_transient
from egm.queue import QueueClient
from egm.bulk.run_store import RUN_TTL_S, RunStore, task_key

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


def is_transient(result: TaskResult) -> bool:
    """A failed task whose kind may pass (egm.contract.ErrorKind.is_transient)."""
    return result.status != "ok" and kind_is_transient(result.error_kind)


class RetryScheduler:
    def __init__(self, queue: QueueClient, settings: Settings | None = None) -> None:
        self.queue = queue
        self.settings = settings or queue.settings
        self.runs = RunStore(queue.redis, queue.prefix)
        self.key = queue.keys.retries()

    def schedule(self, job: BatchJob, result: BatchResult) -> set[str]:
        """Schedule the batch's transient failures that have tries left; returns their task keys."""
        if not job.run_id or self.settings.task_retries <= 0:
            return set()
        by_key = {task_key(t.task_id, t.ref): t for t in job.tasks}
        candidates = [task_key(r.task_id, r.ref) for r in result.results if is_transient(r)]
        candidates = [k for k in candidates if k in by_key]
        if not candidates:
            return set()
        attempts_key = self.runs.key(job.run_id, "attempts")
        with self.queue.redis.pipeline(transaction=False) as pipe:
            for k in candidates:
                pipe.hincrby(attempts_key, k, 1)
            pipe.expire(attempts_key, RUN_TTL_S)
            counts = pipe.execute()[:-1]
        again = {k: n for k, n in zip(candidates, counts) if n <= self.settings.task_retries}
        if not again:
            return set()
        attempt = min(again.values())
        retry = job.model_copy(update={
            "job_id": f"{job.run_id}-retry-{uuid.uuid4().hex[:12]}",
            "tasks": [by_key[k] for k in again], "created_at": time.time()})
        due = time.time() + backoff_s(attempt, self.settings.task_retry_backoff_s, MAX_BACKOFF_S)
        self.queue.redis.zadd(self.key, {retry.model_dump_json(): due})
        log.info("tasks scheduled for retry", extra={"run_id": job.run_id, "tasks": len(again),
                                                     "attempt": attempt, "due_in_s": round(due - time.time(), 1)})
        return set(again)

    def promote_due(self, now: float | None = None, limit: int = 200) -> int:
        """Enqueue retry batches whose time has come (skipping cancelled runs); returns how many."""
        now = time.time() if now is None else now
        members = self.queue.redis.zrangebyscore(self.key, "-inf", now, start=0, num=limit)
        jobs: list[BatchJob] = []
        for member in members:
            if not self.queue.redis.zrem(self.key, member):
                continue  # another promoter took it
            try:
                job = BatchJob.model_validate_json(member)
            except ValueError:
                log.warning("dropping unreadable retry entry")
                continue
            if self.runs.is_cancelled(job.run_id):
                continue
            jobs.append(job)
        for job in jobs:
            self.runs.assign(job.run_id, job)
        if jobs:
            self.queue.enqueue_many(jobs)
        return len(jobs)

    def pending(self, run_id: str) -> dict[str, float]:
        """Task key -> due time of the run's tasks waiting for a retry."""
        out: dict[str, float] = {}
        for member, due in self.queue.redis.zrange(self.key, 0, -1, withscores=True):
            try:
                data = json.loads(member)
            except ValueError:
                continue
            if data.get("run_id") != run_id:
                continue
            for t in data.get("tasks", []):
                out[task_key(t.get("task_id"), t.get("ref"))] = due
        return out

    def drop_run(self, run_id: str) -> int:
        """Forget the run's pending retries (cancel); returns how many batches were dropped."""
        dropped = 0
        for member in self.queue.redis.zrange(self.key, 0, -1):
            try:
                if json.loads(member).get("run_id") == run_id:
                    dropped += self.queue.redis.zrem(self.key, member)
            except ValueError:
                continue
        return dropped

    def reset_attempts(self, run_id: str, keys: list[str]) -> None:
        """A manual retry starts the count afresh."""
        if keys:
            self.queue.redis.hdel(self.runs.key(run_id, "attempts"), *keys)
