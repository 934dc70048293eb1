"""Load the next batch's images while the engine runs this one.

RQ hands a worker one job at a time, so the worker looks ahead itself: once the current
job's images are loaded it peeks at the head of its queues (in the order it serves them,
interactive first), claims one waiting job for prefetching (``prefetch:<job>``, SET NX, so a
fleet of workers does not decode the same images N times) and loads that job's images on a
background thread. When RQ then hands it that job, the images are ready and the GPU does not
wait for downloads and JPEG decoding. If another worker got the job, or an interactive job
came first, the prefetched images are dropped when the next look-ahead starts: at most one
job's images are held.

Loading is what the batch would do itself (``egm.images.fetch_many``) and never raises, so a
result does not depend on whether its images were prefetched; a look-ahead that fails
(Redis, a malformed job) only logs.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from egm.contract import BatchJob, Priority
from egm.queue import QueueClient

log = logging.getLogger(__name__)

#: queued jobs looked at per queue when choosing what to prefetch
PEEK = 4
#: a prefetch claim outlives any plausible wait for the job that made it
CLAIM_TTL_S = 600

Loader = Callable[[BatchJob], list]


class Prefetcher:
    """One background loader per worker; see the module docstring."""

    def __init__(self, queue: QueueClient, load: Loader, worker_name: str,
                 order: list[Priority] | None = None, *, model_version: str) -> None:
        self.queue = queue
        self.load = load
        self.worker_name = worker_name
        self.order = order or [Priority.interactive, Priority.bulk]
        #: the worker's own version: it only ever looks at the queues it serves
        self.model_version = model_version
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="egm-prefetch")
        self._lock = threading.Lock()
        self._job_id: str | None = None
        self._future: Future | None = None
        self.hits = 0
        self.misses = 0

    def take(self, job: BatchJob) -> list | None:
        """This job's images if they were prefetched (waiting for the load to finish), else None."""
        with self._lock:
            mine = self._job_id == job.job_id
            future = self._future if mine else None
            if mine:
                self._job_id, self._future = None, None
        if future is None:
            self.misses += 1
            return None
        try:
            images = future.result()
        except Exception:  # noqa: BLE001 - the loader never raises; if it did, load again in the batch
            log.warning("prefetched images unusable; loading them again", extra={"job_id": job.job_id},
                        exc_info=True)
            self.misses += 1
            return None
        self.hits += 1
        return images

    def look_ahead(self, current_job_id: str) -> str | None:
        """Start loading the images of the next waiting job; returns its id (None: nothing to do)."""
        try:
            job = self._next_job(current_job_id)
        except (redis.RedisError, ValueError) as exc:
            log.warning("prefetch look-ahead failed", extra={"error": str(exc)})
            return None
        if job is None:
            return None
        with self._lock:
            if self._future is not None and not self._future.done():
                return None  # still loading the one chosen before; one at a time
            self._job_id = job.job_id
            self._future = self._pool.submit(self.load, job)
        return job.job_id

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _next_job(self, current_job_id: str) -> BatchJob | None:
        with self._lock:
            pending = self._job_id
        for priority in self.order:
            for job_id in self.queue.queue(priority, self.model_version).get_job_ids(0, PEEK):
                if job_id == current_job_id:
                    continue
                if job_id == pending:
                    return None  # already prefetched and still waiting for RQ to hand it out
                key = self.queue.keys.prefetch(job_id)
                if not self.queue.redis.set(key, self.worker_name, nx=True, ex=CLAIM_TTL_S):
                    continue  # another worker is on it
                try:
                    rq_job = Job.fetch(job_id, connection=self.queue.redis, serializer=JSONSerializer)
                except NoSuchJobError:
                    continue
                if not rq_job.args:
                    continue
                return BatchJob.model_validate(rq_job.args[0])
        return None
