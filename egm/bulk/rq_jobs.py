"""RQ's view of a run's batch jobs: which are alive, which RQ gave up on, cancelling the rest."""

from __future__ import annotations

import logging

from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from egm.bulk.retries import RetryScheduler
from egm.contract import BatchJob, ErrorKind, Priority
from egm.queue import QueueClient
from egm.bulk.run_store import RunState, RunStore, TaskStatus, task_key

log = logging.getLogger(__name__)

#: states in which a job will still run (or is running): its tasks are in flight.
ALIVE = frozenset({JobStatus.QUEUED.value, JobStatus.STARTED.value, JobStatus.DEFERRED.value,
                   JobStatus.SCHEDULED.value})


def job_statuses(queue: QueueClient, job_ids: list[str]) -> dict[str, str | None]:
    """RQ status of each job (``None`` when RQ no longer knows it), one round trip."""
    if not job_ids:
        return {}
    with queue.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        raw = pipe.execute()
    return {j: (s.decode() if s else None) for j, s in zip(job_ids, raw)}


def alive_jobs(queue: QueueClient, job_ids: list[str]) -> set[str]:
    return {j for j, s in job_statuses(queue, job_ids).items() if s in ALIVE}


def free_job_id(queue: QueueClient, job_id: str) -> str:
    """``job_id`` if RQ does not know it, else the first ``job_id-rN`` it does not know.

    Re-running a batch whose earlier job already finished or failed gets a new id, so the
    old job's records (failed registry, result) never mix with the new one."""
    candidate, n = job_id, 1
    while queue.redis.exists(Job.key_for(candidate)):
        n += 1
        candidate = f"{job_id}-r{n}"
    return candidate


def payload_of(queue: QueueClient, job_id: str) -> BatchJob | None:
    try:
        return BatchJob.model_validate(queue.fetch_job(job_id).args[0])
    except Exception:  # noqa: BLE001 - a job we cannot read is reported by the caller
        return None


def fail_abandoned(queue: QueueClient, runs: RunStore, run_id: str, model_version: str) -> int:
    """Tasks of batch jobs that RQ gave up on (retries exhausted) become failed tasks of the run.

    Without this a run whose worker kept dying on one batch would wait forever."""
    registry = FailedJobRegistry(queue=queue.queue(Priority.bulk, model_version))
    mine = [j for j in registry.get_job_ids() if j.startswith(run_id + "-")]
    seen_key = runs.key(run_id, "failed_jobs")
    failed = 0
    for job_id in mine:
        if not queue.redis.sadd(seen_key, job_id):
            continue  # reported before
        queue.redis.expire(seen_key, 30 * 24 * 3600)
        batch = payload_of(queue, job_id)
        if batch is None:
            continue
        reason = _last_error_line(queue, job_id)
        statuses = runs.statuses(run_id, [_key(t) for t in batch.tasks])
        items = [{"task_id": t.task_id, "ref": t.ref, "image": t.image, "kind": ErrorKind.batch,
                  "error": f"batch job {job_id} failed after its retries: {reason}", "job_id": job_id}
                 for t in batch.tasks if statuses.get(_key(t)) not in (TaskStatus.ok, TaskStatus.cached, TaskStatus.skipped)]
        runs.record_failure(run_id, items)
        failed += len(items)
    return failed


def _key(task) -> str:
    return task_key(task.task_id, task.ref)


def _last_error_line(queue: QueueClient, job_id: str) -> str:
    try:
        job = queue.fetch_job(job_id)
        text = (job.latest_result().exc_string if job.latest_result() else None) or ""
    except Exception:  # noqa: BLE001
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "unknown error (worker died or timed out)"


def cancel_jobs(queue: QueueClient, job_ids: list[str]) -> int:
    """Cancel the run's jobs that have not started; returns how many were cancelled."""
    cancelled = 0
    statuses = job_statuses(queue, job_ids)
    for job_id, status in statuses.items():
        if status not in (JobStatus.QUEUED.value, JobStatus.DEFERRED.value, JobStatus.SCHEDULED.value):
            continue
        try:
            queue.fetch_job(job_id).cancel()
            cancelled += 1
        except Exception as exc:  # noqa: BLE001 - it may have started meanwhile; workers skip it anyway
            log.info("could not cancel job", extra={"job_id": job_id, "error": str(exc)})
    return cancelled


def cancel_run(queue: QueueClient, run_id: str) -> dict[str, int]:
    """Stop a run cleanly: mark it cancelled (workers skip its batches, planners stop), cancel its
    queued batches and drop its pending retries. Batches already running finish normally."""
    runs = RunStore(queue.redis, queue.prefix)
    runs.set_state(run_id, RunState.cancelled)
    job_ids = sorted(set(runs.assignments(run_id).values()))
    return {"jobs_cancelled": cancel_jobs(queue, job_ids),
            "retries_dropped": RetryScheduler(queue).drop_run(run_id)}
