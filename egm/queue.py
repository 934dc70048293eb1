"""Enqueue batch jobs and collect their results: the producer side of the queue contract.

Delivery handshake (so a result reaches Label Studio exactly once):

* the worker stores the result, pushes a wake-up on ``done:<job>``, then, if the
  job was handed off, claims ``deliver:<job>`` and writes to Label Studio itself;
* ``/predict`` waits on ``done:<job>`` up to its budget; it returns a result only
  after claiming ``deliver:<job>``; at the deadline it sets ``handoff:<job>``
  and makes one last check for a stored result.

Whoever wins ``SET deliver:<job> NX`` delivers; the ordering (store, then read
handoff / set handoff, then read result) guarantees at least one side sees the
other, and NX guarantees at most one delivers.
"""

from __future__ import annotations

import time

import redis
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from config.settings import Settings
from egm.contract import BATCH_FUNC, BatchJob, BatchResult, Priority, queue_name, redis_key

HANDOFF_TTL_S = 24 * 3600
BLOCK_SLICE_S = 2.0


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30, socket_keepalive=True)


class QueueClient:
    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.queue_prefix
        self.redis = connection or connect(settings)
        self.queues = {
            p: Queue(queue_name(self.prefix, p), connection=self.redis, serializer=JSONSerializer)
            for p in Priority
        }

    def key(self, *parts: str) -> str:
        return redis_key(self.prefix, *parts)

    # -- producer -----------------------------------------------------------------
    def _job_kwargs(self, job: BatchJob) -> dict:
        retry = Retry(max=self.settings.job_retries) if self.settings.job_retries > 0 else None
        return dict(job_id=job.job_id, timeout=self.settings.job_timeout_s, result_ttl=self.settings.result_ttl_s,
                    failure_ttl=self.settings.failure_ttl_s, retry=retry,
                    description=f"egm batch {job.job_id} ({len(job.tasks)} tasks, {job.priority.value})")

    def enqueue(self, job: BatchJob) -> Job:
        queue = self.queues[job.priority]
        return queue.enqueue_call(BATCH_FUNC, args=(job.model_dump(mode="json"),), **self._job_kwargs(job))

    def enqueue_many(self, jobs: list[BatchJob]) -> list[Job]:
        """One round trip per queue for many jobs."""
        out: list[Job] = []
        for priority in Priority:
            batch = [j for j in jobs if j.priority == priority]
            if not batch:
                continue
            queue = self.queues[priority]
            datas = [Queue.prepare_data(BATCH_FUNC, args=(j.model_dump(mode="json"),), **self._job_kwargs(j))
                     for j in batch]
            out.extend(queue.enqueue_many(datas))
        return out

    # -- waiting for results -------------------------------------------------------------
    def wait_any(self, job_ids: list[str], deadline: float) -> str | None:
        """Block until one of the jobs finishes or the deadline passes; returns its id."""
        keys = [self.key("done", j) for j in job_ids]
        while job_ids:
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            # Short slices stay under the client's socket timeout (5 s by default in redis-py).
            popped = self.redis.blpop(keys, timeout=max(0.01, min(remaining, BLOCK_SLICE_S)))
            if popped is not None:
                return popped[0].decode().rsplit(":", 1)[-1]
        return None

    def result(self, job_id: str) -> BatchResult | None:
        raw = self.redis.get(self.key("result", job_id))
        return BatchResult.model_validate_json(raw) if raw else None

    def claim_for_response(self, job_id: str) -> BatchResult | None:
        """The result, if it exists and the worker is not delivering it."""
        result = self.result(job_id)
        if result is None:
            return None
        won = self.redis.set(self.key("deliver", job_id), "backend", nx=True, ex=HANDOFF_TTL_S)
        return result if won else None

    def hand_off(self, job_id: str) -> BatchResult | None:
        """Stop waiting: the worker delivers when done. Returns the result if it landed just now."""
        self.redis.set(self.key("handoff", job_id), "1", ex=HANDOFF_TTL_S)
        return self.claim_for_response(job_id)

    # -- worker side -------------------------------------------------------------------------
    def store_result(self, result: BatchResult) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self.key("result", result.job_id), result.model_dump_json(), ex=self.settings.result_ttl_s)
            done = self.key("done", result.job_id)
            pipe.delete(done)
            pipe.rpush(done, "1")
            pipe.expire(done, self.settings.result_ttl_s)
            pipe.execute()

    def worker_must_deliver(self, job_id: str) -> bool:
        """After storing: did /predict hand this job off, and did we win the delivery?"""
        if not self.redis.exists(self.key("handoff", job_id)):
            return False
        return bool(self.redis.set(self.key("deliver", job_id), "worker", nx=True, ex=HANDOFF_TTL_S))

    # -- introspection -------------------------------------------------------------------------
    def depths(self) -> dict[str, dict[str, int]]:
        out = {}
        for p, q in self.queues.items():
            out[p.value] = {
                "queued": q.count,
                "started": StartedJobRegistry(queue=q).count,
                "failed": FailedJobRegistry(queue=q).count,
            }
        return out

    def recover_abandoned(self) -> None:
        """Re-queue jobs whose worker died (RQ retries them if they have retries left)."""
        for q in self.queues.values():
            StartedJobRegistry(queue=q).cleanup()
