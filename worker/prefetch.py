"""Load the next batch's images while the engine runs this one.

RQ hands a worker one job at a time, so the worker looks ahead itself: once the current
job's images are loaded it peeks at the head of its queues, claims a waiting job for
prefetching (``prefetch:<job>``, SET NX, so a fleet of workers does not decode the same images
N times) and loads that job's images on a background thread. When RQ then hands it that job
(or the worker takes it during a pause of a bulk batch, :mod:`egm.worker.preempt`), the images
are ready and the GPU does not wait for downloads and JPEG decoding.

Each priority has a lane of its own (one thread, at most one job's images held): the one image
of an interactive job never waits behind the 64-256 images of the next bulk job. If another
worker got the job, the prefetched images are dropped when that lane's next look-ahead starts.

Loading is what the batch would do itself (``egm.images.fetch_many``) and never raises, so a
result does not depend on whether its images were prefetched; a look-ahead that fails
(Redis, a malformed job) only logs.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass
class _Lane:
    """One priority's loader: a thread and the one job it loads (or holds) images for."""

    pool: ThreadPoolExecutor
    job_id: str | None = None
    future: Future | None = None

    def busy(self) -> bool:
        return self.future is not None and not self.future.done()


class Prefetcher:
    """Background loaders of one worker, a lane per priority; see the module docstring."""

    def __init__(self, queue: QueueClient, load: Loader, worker_name: str,
                 order: list[Priority] | None = None, *, model_version: str) -> None:
        self.queue = queue
        self.load = load
        self.worker_name = worker_name
        self.order = order or [Priority.interactive, Priority.bulk]
        #: the worker's own version: it only ever looks at the queues it serves
        self.model_version = model_version
        self._lanes = {p: _Lane(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"egm-prefetch-{p.value}"))
                       for p in self.order}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def take(self, job: BatchJob) -> list | None:
        """This job's images if they were prefetched (waiting for the load to finish), else None."""
        future = None
        with self._lock:
            for lane in self._lanes.values():
                if lane.job_id == job.job_id:
                    future, lane.job_id, lane.future = lane.future, None, None
                    break
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

    def look_ahead(self, current_job_id: str, priorities: list[Priority] | None = None) -> str | None:
        """Start loading the images of the next waiting job of each idle lane (of ``priorities``, default
        all); returns the id of the first job started (None: nothing to do)."""
        started = None
        for priority in priorities or self.order:
            lane = self._lanes.get(priority)
            if lane is None:
                continue
            with self._lock:
                if lane.busy():
                    continue  # still loading the one chosen before; one at a time per lane
                pending = lane.job_id
            try:
                job = self._next_job(priority, current_job_id, pending)
            except (redis.RedisError, ValueError) as exc:
                log.warning("prefetch look-ahead failed", extra={"error": str(exc)})
                continue
            if job is None:
                continue
            with self._lock:
                lane.job_id, lane.future = job.job_id, lane.pool.submit(self.load, job)
            started = started or job.job_id
        return started

    def loading(self, job_id: str) -> bool | None:
        """True while this job's images are loading, False once they are ready, None if they are not ours."""
        with self._lock:
            for lane in self._lanes.values():
                if lane.job_id == job_id:
                    return lane.busy()
        return None

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.pool.shutdown(wait=False, cancel_futures=True)

    def _next_job(self, priority: Priority, current_job_id: str, pending: str | None) -> BatchJob | None:
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
