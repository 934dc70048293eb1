"""Turn a run's tasks into batch jobs, enqueueing only what still needs work, never twice.

A task is *not* enqueued when it

* already has a prediction of the run's ``model_version`` in Label Studio (``skipped``),
* is already in the local results log (local runs),
* sits in a batch job that RQ will still run, or waits for a retry (in flight),
* failed for good in an earlier invocation (unless ``retry_failed``).

Everything else goes into batches of ``batch_size`` tasks, enqueued ``flush_jobs``
batches per Redis round trip while the source is still being read, so workers start
on the first batches while a 50,000-task project is still being listed.

One planner per run at a time (a Redis lock); the in-flight snapshot is taken before
the source is read, so a task finished meanwhile is seen as predicted by the listing.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

from egm.bulk.rq_jobs import alive_jobs, free_job_id
from egm.bulk.retries import RetryScheduler
from egm.bulk.sources import SourceTask
from egm.bulk.spec import RunSpec, batch_job_id
from egm.contract import BatchJob, ErrorKind, Priority, TaskJob
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore, TaskStatus, task_key

log = logging.getLogger(__name__)


class PlannerBusy(RuntimeError):
    """Another process is planning this run right now."""


@dataclass
class PlanReport:
    total: int = 0
    #: already predicted at this model_version (Label Studio).
    skipped: int = 0
    #: already in the local results log.
    done: int = 0
    #: failed in an earlier invocation and not retried now.
    failed_kept: int = 0
    in_flight: int = 0
    #: tasks that cannot run (no image, outside the files root): reported as failed.
    rejected: int = 0
    enqueued_tasks: int = 0
    enqueued_jobs: list[str] = field(default_factory=list)
    #: task key -> image reference, of every task of the source (local runs write outputs from it).
    images: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False


class Planner:
    def __init__(self, queue: QueueClient, spec: RunSpec, *, flush_jobs: int = 50,
                 on_flush: Callable[[PlanReport], None] | None = None,
                 has_prediction: Callable[[int], bool] | None = None) -> None:
        self.queue = queue
        #: asks Label Studio now whether a task has a prediction of the run's version (see _flush)
        self.has_prediction = has_prediction
        self.spec = spec
        self.runs = RunStore(queue.redis, queue.prefix)
        self.retries = RetryScheduler(queue)
        self.flush_jobs = max(1, flush_jobs)
        self.on_flush = on_flush
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    # -- public ---------------------------------------------------------------------
    def plan(self, tasks: Iterable[SourceTask], *, done_keys: set[str] | frozenset = frozenset(),
             retry_failed: bool = False) -> PlanReport:
        run_id = self.spec.run_id
        if not self.runs.acquire_lock(run_id, self.owner):
            raise PlannerBusy(f"run {run_id} is being planned by {self.runs.lock_owner(run_id)}")
        try:
            return self._plan(tasks, set(done_keys), retry_failed)
        finally:
            self.runs.release_lock(run_id, self.owner)

    def in_flight(self) -> set[str]:
        """Task keys in a live batch job or waiting for a retry."""
        assign = self.runs.assignments(self.spec.run_id)
        alive = alive_jobs(self.queue, sorted(set(assign.values())))
        return {k for k, j in assign.items() if j in alive} | set(self.retries.pending(self.spec.run_id))

    # -- internals ---------------------------------------------------------------------
    def _plan(self, tasks: Iterable[SourceTask], done_keys: set[str], retry_failed: bool) -> PlanReport:
        run_id = self.spec.run_id
        statuses = self.runs.statuses(run_id)
        flying = self.in_flight()
        report = PlanReport()
        pending: list[SourceTask] = []
        batches: list[BatchJob] = []
        skipped: list[str] = []
        rejected: list[dict] = []
        for task in tasks:
            report.total += 1
            key = task.key
            report.images[key] = task.image or (task.ref or "")
            if task.predicted:
                report.skipped += 1
                skipped.append(key)
            elif key in done_keys:
                report.done += 1
            elif task.problem:
                report.rejected += 1
                rejected.append({"task_id": task.task_id, "ref": task.ref, "image": task.image or None,
                                 "kind": ErrorKind.request, "error": task.problem})
            elif key in flying:
                report.in_flight += 1
            elif statuses.get(key) == TaskStatus.failed and not retry_failed:
                report.failed_kept += 1
            else:
                pending.append(task)
                if len(pending) >= self.spec.batch_size:
                    batches.append(self._batch(pending))
                    pending = []
            if len(batches) >= self.flush_jobs or len(skipped) >= 1000:
                if not self._flush(report, batches, skipped, rejected):
                    return report
                batches, skipped, rejected = [], [], []
        if pending:
            batches.append(self._batch(pending))
        if self._flush(report, batches, skipped, rejected):
            # tasks this run knew that are no longer in the source must not count towards it
            self.runs.forget(run_id, [k for k in statuses if k not in report.images])
            self.runs.set_total(run_id, report.total)
            self.runs.set_planned(run_id)
        return report

    def _batch(self, tasks: list[SourceTask]) -> BatchJob:
        keys = [t.key for t in tasks]
        job_id = free_job_id(self.queue, batch_job_id(self.spec.run_id, keys))
        return BatchJob(
            job_id=job_id, priority=Priority.bulk, project_id=self.spec.project_id,
            model_version=self.spec.model_version, target=self.spec.target,
            tasks=[TaskJob(task_id=t.task_id, ref=t.ref, image=t.image, queries=self.spec.queries) for t in tasks],
            write_to_label_studio=self.spec.kind == "label_studio", deliver_late=False, run_id=self.spec.run_id)

    def _flush(self, report: PlanReport, batches: list[BatchJob], skipped: list[str], rejected: list[dict]) -> bool:
        """Enqueue what was planned so far; False when the run was cancelled meanwhile."""
        run_id = self.spec.run_id
        if self.runs.is_cancelled(run_id):
            report.cancelled = True
            return False
        self.runs.mark_skipped(run_id, skipped)
        self.runs.record_failure(run_id, rejected)
        if batches:
            if self.spec.kind == "label_studio":
                batches = self._release_stale_claims(report, batches)
            for job in batches:  # assignments first: a crash in between never leaves a job unaccounted
                self.runs.assign(run_id, job)
                self.runs.mark_queued(run_id, [task_key(t.task_id, t.ref) for t in job.tasks])
            self.queue.enqueue_many(batches)
            n = sum(len(j.tasks) for j in batches)
            self.runs.add_enqueued(run_id, n)
            report.enqueued_tasks += n
            report.enqueued_jobs.extend(j.job_id for j in batches)
        self.runs.set_total(run_id, report.total)
        self.runs.refresh_lock(run_id, self.owner)
        if self.on_flush is not None:
            self.on_flush(report)
        return True

    def _release_stale_claims(self, report: PlanReport, batches: list[BatchJob]) -> list[BatchJob]:
        """A task we enqueue had no prediction of this version when the source was listed and has no
        live job, so a ``done`` write claim for it is stale (the prediction was deleted): drop it, or
        the worker would skip the write and the task would stay without a prediction.

        But a job that RQ already counted done may still sit in a worker's outbox, and its writer
        may have written the prediction (and set the claim) after the listing. Releasing that claim
        would write the task twice, so each ``done`` claim is checked against Label Studio now: a
        task that has its prediction is skipped and keeps its claim. Returns the batches left."""
        tasks = [t for j in batches for t in j.tasks if t.task_id is not None]
        keys = [self.queue.keys.written(self.spec.model_version, t.task_id) for t in tasks]
        values = self.queue.redis.mget(keys) if keys else []
        claimed = {t.task_id: k for t, k, v in zip(tasks, keys, values) if v == b"done"}
        if not claimed:
            return batches
        written = {tid for tid in claimed if self.has_prediction is not None and self.has_prediction(tid)}
        stale = [k for tid, k in claimed.items() if tid not in written]
        if stale:
            self.queue.redis.delete(*stale)
            log.info("released write claims of deleted predictions", extra={"count": len(stale)})
        if not written:
            return batches
        log.info("skipped tasks written since the listing", extra={"count": len(written)})
        self.runs.mark_skipped(self.spec.run_id, [task_key(tid, None) for tid in written])
        report.skipped += len(written)
        kept = []
        for job in batches:
            job.tasks = [t for t in job.tasks if t.task_id not in written]
            if job.tasks:
                kept.append(job)
        return kept
