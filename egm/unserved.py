"""Jobs planned for a ``model_version`` that no live worker serves: they wait, then fail with a reason.

After a rolling upgrade the old version's queued jobs are drained by the old workers still
running. Once none is left, its jobs wait ``EGM_VERSION_WAIT_S`` (from when a worker of that
version was last seen, or from enqueueing when none ever was), in case one comes back; then any
live worker fails them between jobs: every task gets ``error_kind`` ``version`` and a reason that
names the version the job was planned for and the versions live workers serve. The result is
stored like any other, so a waiting ``/predict`` answers and a bulk run counts the tasks failed
(``prelabel`` again re-plans them under the live version, as a new run).

Removing the job id from its queue (``LREM``) decides who fails it: a worker that dequeued it
first runs it; of several sweepers one wins. The RQ job ends ``canceled``.
"""

from __future__ import annotations

import logging

from rq.job import Job

from egm.contract import BatchJob, ErrorKind, BatchResult, TaskResult
from egm.fleet import FleetView
from egm.queue import QueueClient
from egm.bulk.completion import finish_if_done
from egm.bulk.run_store import RunStore

log = logging.getLogger(__name__)


def unserved_reason(version: str, live: list[str], wait_s: float) -> str:
    serving = ", ".join(sorted(live)) or "nothing"
    return (f"planned for model_version {version}, which no live worker served for {wait_s:.0f} s "
            f"(EGM_VERSION_WAIT_S); live workers serve {serving}: plan it again (prelabel again, or reopen "
            f"the task in Label Studio)")


def fail_unserved(queue: QueueClient, view: FleetView, wait_s: float, sweeper: str, limit: int = 500) -> int:
    """Fail the overdue jobs of versions without a live worker; returns how many jobs were failed."""
    live = view.live_versions()
    failed = 0
    for _, version, q in queue.all_queues():
        if version in live:
            continue
        last_seen = view.last_seen.get(version, 0.0)
        if view.now - last_seen < wait_s:
            continue  # its workers were here recently: every job of the queue may still be taken
        job_ids = q.get_job_ids(0, limit - 1)
        for job_id, job in zip(job_ids, Job.fetch_many(job_ids, connection=queue.redis, serializer=queue.serializer)):
            if job is None:
                q.remove(job_id)  # an id whose job expired: nothing to run
                continue
            enqueued = job.enqueued_at.timestamp() if job.enqueued_at else view.now
            if view.now - max(last_seen, enqueued) < wait_s:
                continue
            if not queue.redis.lrem(q.key, 1, job_id):
                continue  # a worker or another sweeper took it first
            _fail(queue, job, unserved_reason(version, list(live), wait_s), sweeper)
            failed += 1
    return failed


def _fail(queue: QueueClient, job: Job, reason: str, sweeper: str) -> None:
    try:
        payload = BatchJob.model_validate(job.args[0])
    except Exception:  # noqa: BLE001 - not one of ours: nobody waits for it
        log.warning("dropping an unreadable job of an unserved version", extra={"job_id": job.id})
        job.cancel()
        return
    result = BatchResult(job_id=payload.job_id, model_version=payload.model_version, worker=sweeper, results=[
        TaskResult(task_id=t.task_id, ref=t.ref, status="failed", error=reason, error_kind=ErrorKind.version)
        for t in payload.tasks])
    queue.store_result(result)
    if payload.run_id:
        runs = RunStore(queue.redis, queue.prefix)
        runs.record(payload, result)
        finish_if_done(runs, payload.run_id)  # its tasks all resolved now: the run reads done
    job.cancel()
    log.warning("failed a job no worker of its version took", extra={
        "job_id": payload.job_id, "model_version": payload.model_version, "tasks": len(payload.tasks),
        "run_id": payload.run_id, "reason": reason})
