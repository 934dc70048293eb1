"""Interactive jobs run during a pause of the bulk batch on the GPU (issue 13, item 7).

An annotator's ``/predict`` must not wait for a bulk batch of 64-256 images to finish. Engines
that can pause (``Engine.pauses``: the hf fast path every few decode steps and inside the
prefill) call ``between_steps`` while a bulk batch runs; :class:`Preemptor` is that hook. At most
every ``EGM_PREEMPT_CHECK_S`` it looks at the head of the worker's own interactive queue (one
``LINDEX``); when a job waits there:

* its images load on the prefetcher's interactive lane (:mod:`egm.worker.prefetch`) while the
  bulk batch keeps decoding; the job is taken once they are ready (or at once without a
  prefetcher, or when another worker claimed its prefetch);
* it is popped from the queue as RQ's own dequeue pops it and run by the worker through RQ
  (:meth:`egm.worker.batch_worker.BatchWorker.run_inline`): started registry, heartbeats, the job
  function (:func:`egm.worker.rq_entry.run_batch`), finished/failed registries, retries. Its result
  reaches ``/predict`` or Label Studio by the same exactly-once path as any job's;
* the engine runs it to completion inside the pause (one level deep: the interactive batch does
  not pause again), then the bulk batch goes on where it stopped, its answers unchanged.

A worker SIGKILLed in the middle leaves both jobs in RQ's started registries; their heartbeats
stop and both are re-queued as any abandoned job (``tests/test_faults.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue

from egm.contract import Priority
from egm.queue import QueueClient
from egm.worker.prefetch import Prefetcher

log = logging.getLogger(__name__)

#: runs one dequeued job to completion through RQ (the worker's ``run_inline``)
RunInline = Callable[[Job, Queue], None]


class Preemptor:
    """The ``between_steps`` hook of bulk batches; see the module docstring."""

    def __init__(self, queue: QueueClient, model_version: str, *, check_every_s: float,
                 prefetcher: Prefetcher | None = None) -> None:
        self.queue = queue
        self.model_version = model_version
        self.check_every_s = check_every_s
        self.prefetcher = prefetcher
        #: set by the worker's work loop (a new one after each restart); None: take nothing
        self.run_inline: RunInline | None = None
        #: returns True once the worker was asked to stop: then nothing more is taken
        self.stopping: Callable[[], bool] = lambda: False
        self._next_check = 0.0
        self._inside = False
        self._current: str | None = None
        #: interactive jobs run during pauses, and the seconds they took (bulk GPU time excludes them)
        self.taken = 0
        self.seconds = 0.0

    def hook_for(self, job_id: str, priority: Priority):
        """The ``between_steps`` hook for this job's batch: bulk batches pause, others do not."""
        if priority != Priority.bulk or self.run_inline is None:
            return None
        self._current = job_id
        return self.pause

    def pause(self) -> None:
        """Called by the engine where the bulk batch can wait: run one waiting interactive job, if any."""
        if self._inside or self.run_inline is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.check_every_s
        try:
            taken = self._take()
        except redis.RedisError as exc:  # the bulk batch goes on; the job waits for the next check
            log.warning("could not check the interactive queue during a pause", extra={"error": str(exc)})
            return
        if taken is None:
            return
        job, queue = taken
        self._inside = True
        t0 = time.perf_counter()
        try:
            log.info("interactive job runs in a pause of the bulk batch",
                     extra={"job_id": job.id, "paused_job_id": self._current})
            self.run_inline(job, queue)
        finally:
            self._inside = False
            self.taken += 1
            self.seconds += time.perf_counter() - t0
            self._next_check = 0.0  # another one may be waiting already

    def _take(self) -> tuple[Job, Queue] | None:
        """Pop the interactive queue's head once its images are ready; None when nothing is to run now."""
        if self.stopping():
            return None
        queue = self.queue.queue(Priority.interactive, self.model_version)
        head = self.queue.redis.lindex(queue.key, 0)
        if head is None:
            return None
        if self.prefetcher is not None and self._still_loading(head.decode()):
            return None
        popped = Queue.lpop([queue.key], None, connection=self.queue.redis)  # RQ's own non-blocking dequeue
        if popped is None:
            return None  # another worker took it
        job_id = popped[1].decode() if isinstance(popped[1], bytes) else str(popped[1])
        try:
            job = self.queue.fetch_job(job_id)
        except NoSuchJobError:  # deleted or expired: RQ's dequeue skips such ids too
            log.warning("dequeued an interactive job that no longer exists", extra={"job_id": job_id})
            return None
        return job, queue

    def _still_loading(self, job_id: str) -> bool:
        """Start the job's images on the interactive lane if nobody did; True while they load."""
        state = self.prefetcher.loading(job_id)
        if state is None:
            self.prefetcher.look_ahead(self._current or "", [Priority.interactive])
            state = self.prefetcher.loading(job_id)
        return bool(state)  # None: another worker prefetches it; take it and load here
