"""Enqueue batch jobs and collect their results: the producer side of the queue contract.

Delivery handshake (so a result reaches Label Studio exactly once):

* before enqueueing, ``/predict`` writes its deadline to ``handoff:<job>``;
* the worker stores the result, pushes a wake-up on ``done:<job>``, then reads
  ``handoff:<job>``: past the deadline it claims ``deliver:<job>`` and writes to
  Label Studio itself; before it, it files the job in the ``late`` schedule
  (due at the deadline plus a grace period) and lets ``/predict`` answer;
* ``/predict`` waits on ``done:<job>`` up to its budget; it returns a result only
  after claiming ``deliver:<job>`` (which also takes the job off the ``late``
  schedule); at the deadline it moves ``handoff:<job>`` to "now" and makes one
  last check for a stored result;
* :meth:`QueueClient.collect` is the requester's whole algorithm (wait, claim, hand off);
* workers sweep the ``late`` schedule between jobs: a due job that nobody claimed
  (the backend died or lost Redis while it waited) is claimed and delivered then.

Whoever wins ``SET deliver:<job> NX`` delivers; the ordering (store, then read
handoff / set handoff, then read result) guarantees at least one side sees the
other, the schedule covers a requester that vanished, and NX guarantees at most
one delivers. A worker may re-enter its own claim (a retried job after a failed
write); per-task claims in :mod:`egm.worker.delivery` keep those writes exactly-once.
"""

from __future__ import annotations

import time
from typing import Iterator

import redis
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from egm.config.settings import Settings
from egm.contract import BATCH_FUNC, BatchJob, BatchResult, Priority, parse_queue_name, queue_name
from egm.keys import Keys

HANDOFF_TTL_S = 24 * 3600
BLOCK_SLICE_S = 2.0
#: A worker delivers a result nobody claimed this long after the requester's deadline
#: (room for a live backend's last check and for clock skew between machines).
LATE_GRACE_S = 5.0
#: ``handoff:<job>`` value meaning "the requester stopped waiting: deliver now".
HANDOFF_NOW = "0"

# File a job for the late sweep unless the requester claimed it already; atomic, so it cannot
# interleave with claim_for_response's claim-and-unfile transaction (nothing is filed after it).
# KEYS: deliver, late, late-project. ARGV: due, job id, project id ("" for none).
_DEFER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return 1
"""


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30, socket_keepalive=True)


class QueueClient:
    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self.prefix = settings.queue_prefix
        self.keys = Keys(self.prefix)
        self.redis = connection or connect(settings)
        self.serializer = JSONSerializer
        self._queues: dict[str, Queue] = {}
        self._defer = self.redis.register_script(_DEFER_LUA)

    # -- queues: one pair per model_version (egm.contract) ----------------------------------
    def queue(self, priority: Priority, model_version: str) -> Queue:
        name = queue_name(self.prefix, priority, model_version)
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis, serializer=JSONSerializer)
        return self._queues[name]

    def worker_queues(self, model_version: str, priorities: list[Priority] | None = None) -> list[Queue]:
        """What a worker serving ``model_version`` listens to, highest priority first."""
        return [self.queue(p, model_version) for p in (priorities or [Priority.interactive, Priority.bulk])]

    def all_queues(self) -> list[tuple[Priority, str, Queue]]:
        """Every version queue of this prefix RQ knows (housekeeping and status cover them all)."""
        out = []
        for raw in self.redis.smembers(Queue.redis_queues_keys):
            name = raw.decode().removeprefix(Queue.redis_queue_namespace_prefix)
            parsed = parse_queue_name(self.prefix, name)
            if parsed is not None:
                out.append((parsed[0], parsed[1], self.queue(*parsed)))
        return sorted(out, key=lambda t: (t[1], t[0] != Priority.interactive))

    # -- producer -----------------------------------------------------------------
    def _job_kwargs(self, job: BatchJob) -> dict:
        retry = Retry(max=self.settings.job_retries) if self.settings.job_retries > 0 else None
        return dict(job_id=job.job_id, timeout=self.settings.job_timeout_s, result_ttl=self.settings.result_ttl_s,
                    failure_ttl=self.settings.failure_ttl_s, retry=retry,
                    description=f"egm batch {job.job_id} ({len(job.tasks)} tasks, {job.priority.value})")

    def enqueue(self, job: BatchJob) -> Job:
        """Into the queue of the job's priority and model_version: only workers serving it take it."""
        queue = self.queue(job.priority, job.model_version)
        return queue.enqueue_call(BATCH_FUNC, args=(job.model_dump(mode="json"),), **self._job_kwargs(job))

    def enqueue_many(self, jobs: list[BatchJob]) -> list[Job]:
        """One round trip per queue for many jobs."""
        out: list[Job] = []
        groups: dict[tuple[Priority, str], list[BatchJob]] = {}
        for job in jobs:
            groups.setdefault((job.priority, job.model_version), []).append(job)
        for (priority, version), batch in groups.items():
            datas = [Queue.prepare_data(BATCH_FUNC, args=(j.model_dump(mode="json"),), **self._job_kwargs(j))
                     for j in batch]
            out.extend(self.queue(priority, version).enqueue_many(datas))
        return out

    def fetch_job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=self.serializer)

    def expect_response(self, job_ids: list[str], deadline: float) -> None:
        """Before enqueueing: the requester claims these results until ``deadline``, the worker after it.

        Written before the jobs exist, so a worker always sees it; if the requester dies
        while waiting, the workers' ``late`` sweep delivers the results.
        """
        if not job_ids:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(self.keys.handoff(job_id), repr(float(deadline)), ex=HANDOFF_TTL_S)
            pipe.execute()

    # -- waiting for results -------------------------------------------------------------
    def wait_any(self, job_ids: list[str], deadline: float) -> str | None:
        """Block until one of the jobs finishes or the deadline passes; returns its id."""
        keys = [self.keys.done(j) for j in job_ids]
        while job_ids:
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            # Short slices stay under the client's socket timeout (5 s by default in redis-py).
            popped = self.redis.blpop(keys, timeout=max(0.01, min(remaining, BLOCK_SLICE_S)))
            if popped is not None:
                return Keys.job_of(popped[0])
        return None

    def result(self, job_id: str) -> BatchResult | None:
        raw = self.redis.get(self.keys.result(job_id))
        return BatchResult.model_validate_json(raw) if raw else None

    def results(self, job_ids: list[str], chunk: int = 200) -> Iterator[BatchResult]:
        """Stored results of many jobs, ``chunk`` per round trip; expired or missing ones are skipped."""
        for start in range(0, len(job_ids), chunk):
            for raw in self.redis.mget([self.keys.result(j) for j in job_ids[start:start + chunk]]):
                if raw:
                    yield BatchResult.model_validate_json(raw)

    def claim_for_response(self, job_id: str) -> BatchResult | None:
        """The result, if it exists and the worker is not delivering it."""
        result = self.result(job_id)
        if result is None:
            return None
        # Answered here: the markers need only outlive the result (afterwards nobody can deliver it).
        ttl = max(60, self.settings.result_ttl_s)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.deliver(job_id), "backend", nx=True, ex=ttl)
            # and the late sweep has nothing to do for it
            pipe.zrem(self.keys.late(), job_id)
            pipe.hdel(self.keys.late_project(), job_id)
            won = pipe.execute()[0]
        if won:
            self.redis.expire(self.keys.handoff(job_id), ttl)
        return result if won else None

    def hand_off(self, job_id: str) -> BatchResult | None:
        """Stop waiting: the worker delivers when done. Returns the result if it landed just now."""
        self.redis.set(self.keys.handoff(job_id), HANDOFF_NOW, ex=HANDOFF_TTL_S)
        return self.claim_for_response(job_id)

    def collect(self, job_ids: list[str], deadline: float) -> dict[str, BatchResult]:
        """The requester's half of the hand-off: wait for the jobs until ``deadline``, keep each result
        whose delivery it wins, and hand the rest off to the workers (who write them to Label Studio)."""
        results: dict[str, BatchResult] = {}
        waiting = set(job_ids)
        while waiting:
            finished = self.wait_any(sorted(waiting), deadline)
            if finished is None:
                break
            waiting.discard(finished)
            batch = self.claim_for_response(finished)
            if batch is not None:
                results[finished] = batch
        for job_id in waiting:
            batch = self.hand_off(job_id)
            if batch is not None:
                results[job_id] = batch
        return results

    # -- worker side -------------------------------------------------------------------------
    def store_result(self, result: BatchResult) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self.keys.result(result.job_id), result.model_dump_json(), ex=self.settings.result_ttl_s)
            done = self.keys.done(result.job_id)
            pipe.delete(done)
            pipe.rpush(done, "1")
            pipe.expire(done, self.settings.result_ttl_s)
            pipe.execute()

    def handoff_due(self, job_id: str) -> float | None:
        """When the worker may deliver this job's result (epoch seconds); ``None``: never (not handed off)."""
        raw = self.redis.get(self.keys.handoff(job_id))
        if raw is None:
            return None
        try:
            return float(raw)
        except ValueError:  # an older backend wrote "1": handed off now
            return 0.0

    def worker_must_deliver(self, job_id: str) -> bool:
        """After storing: is the requester's deadline past, and is the delivery ours?"""
        due = self.handoff_due(job_id)
        if due is None or due > time.time():
            return False
        return self._claim_delivery(job_id)

    def _claim_delivery(self, job_id: str) -> bool:
        key = self.keys.deliver(job_id)
        if self.redis.set(key, "worker", nx=True, ex=HANDOFF_TTL_S):
            return True
        # Already the workers': a retry of a job whose write failed delivers again (per-task claims dedupe).
        return self.redis.get(key) == b"worker"

    def defer_delivery(self, job_id: str, project_id: int | None, due: float) -> bool:
        """File a finished job for the ``late`` sweep, unless the requester already claimed it."""
        keys = [self.keys.deliver(job_id), self.keys.late(), self.keys.late_project()]
        args = [due + LATE_GRACE_S, job_id, "" if project_id is None else str(project_id)]
        return bool(self._defer(keys=keys, args=args))

    def take_due_deliveries(self, now: float | None = None, limit: int = 100) -> list[tuple[str, int | None]]:
        """Remove and return due ``late`` entries as (job id, project id); each goes to one sweeper only."""
        key = self.keys.late()
        job_ids = self.redis.zrangebyscore(key, 0, now if now is not None else time.time(), start=0, num=limit)
        out = []
        for raw in job_ids:
            if self.redis.zrem(key, raw):  # the sweeper that removes it owns it
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hget(self.keys.late_project(), raw)
                    pipe.hdel(self.keys.late_project(), raw)
                    project = pipe.execute()[0]
                out.append((raw.decode(), int(project) if project else None))
        return out

    def late_pending(self) -> int:
        return int(self.redis.zcard(self.keys.late()))

    # -- introspection -------------------------------------------------------------------------
    def depths(self) -> dict[str, dict]:
        """Per queue (``<priority>@<model_version>``): jobs queued, running and failed."""
        out = {}
        for priority, version, q in self.all_queues():
            out[f"{priority.value}@{version}"] = {
                "priority": priority.value, "model_version": version, "queued": q.count,
                "started": StartedJobRegistry(queue=q).count, "failed": FailedJobRegistry(queue=q).count,
            }
        return out

    def recover_abandoned(self) -> None:
        """Re-queue jobs whose worker died (RQ retries them if they have retries left), in every version's queues."""
        for _, _, q in self.all_queues():
            StartedJobRegistry(queue=q).cleanup()
