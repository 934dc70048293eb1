"""The function RQ runs for every batch job (``egm.contract.BATCH_FUNC``).

It runs inside the long-lived worker process, which installs a :class:`Runtime`
once at start-up (engine loaded, connections open); jobs only reference it.

The GPU should never wait for anything but the engine: a job takes images the prefetcher
loaded while the previous batch ran (:mod:`egm.worker.prefetch`) and starts loading the next
job's, and a bulk job hands its Label Studio write to the outbox (:mod:`egm.worker.outbox`)
instead of waiting for it; the background writer then writes and records the run's progress
(:func:`write_entry`). How predictions are written (waiting out Label Studio outages, refusals,
late interactive results) is the write policy of :mod:`egm.worker.delivery`, not this module's.

A bulk batch offers the engine a pause hook (:mod:`egm.worker.preempt`): a waiting interactive
job runs through this same function inside the bulk batch's engine call.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from egm.contract import BatchJob, ErrorKind, BatchResult, TaskResult
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from egm.worker.delivery import Delivery, LabelStudioWriter
from egm.worker.outbox import BackgroundWriter, Entry
from egm.worker.batch_processor import BatchProcessor, BatchStats
from egm.worker.preempt import Preemptor
from egm.worker.prefetch import Prefetcher

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    processor: BatchProcessor
    queue: QueueClient
    writer: LabelStudioWriter
    #: optional hook called with (job, result, stats) after each batch (progress counters, metrics).
    on_batch_done: object | None = None
    #: loads the next job's images while the engine runs (None: each job loads its own)
    prefetcher: Prefetcher | None = None
    #: writes bulk predictions in the background from the Redis outbox (None: the job writes them)
    outbox: BackgroundWriter | None = None
    #: runs waiting interactive jobs during pauses of bulk batches (None: they wait for the batch)
    preemptor: Preemptor | None = None

    @property
    def delivery(self) -> Delivery:
        """The write policy (egm.worker.delivery) with this worker's writer, queue and patience."""
        return Delivery(self.writer, self.queue, self.processor.settings.ls_outage_wait_s)


_RUNTIME: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _RUNTIME
    _RUNTIME = runtime


def runtime() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("batch jobs must run inside `egm-assist worker` (no engine is loaded in this process)")
    return _RUNTIME


def run_batch(payload: dict) -> dict:
    rt = runtime()
    job = BatchJob.model_validate(payload)
    if job.run_id and RunStore(rt.queue.redis, rt.queue.prefix).is_cancelled(job.run_id):
        log.info("batch skipped: its run was cancelled", extra={"job_id": job.job_id, "run_id": job.run_id})
        return {"job_id": job.job_id, "ok": 0, "failed": 0, "written": 0, "cancelled": True}
    if job.model_version != rt.processor.model_version:
        return _refuse_other_version(rt, job)
    t0 = time.perf_counter()
    images = rt.prefetcher.take(job) if rt.prefetcher is not None else None
    prefetched = images is not None
    if images is None:
        images = rt.processor.load_images(job)
    image_wait = time.perf_counter() - t0
    if rt.prefetcher is not None:
        rt.prefetcher.look_ahead(job.job_id)  # the next job's images load while the engine runs this one
    pause = rt.preemptor.hook_for(job.job_id, job.priority) if rt.preemptor is not None else None
    paused_before = rt.preemptor.seconds if pause is not None else 0.0
    result = rt.processor.process(job, images=images, between_steps=pause)
    stats = rt.processor.last_stats
    stats.image_seconds, stats.prefetched = image_wait, prefetched
    if pause is not None:  # the interactive jobs run in its pauses are not this batch's GPU time
        stats.gpu_seconds = max(0.0, stats.gpu_seconds - (rt.preemptor.seconds - paused_before))
    written, queued = 0, False
    if job.write_to_label_studio and rt.outbox is not None:
        rt.queue.store_result(result)
        rt.delivery.check_writable(result)
        rt.outbox.file(job, result, asdict(stats))  # durable before RQ counts the job done
        queued = True  # the writer records the batch once written
    elif job.write_to_label_studio:
        written = rt.delivery.write(job.project_id, result)
        _finish(rt, job, result, stats)
    else:
        _finish(rt, job, result, stats)
        if job.deliver_late:
            written = rt.delivery.deliver_late(job, result)  # after storing: the handshake with /predict needs it
    ok = sum(r.status == "ok" for r in result.results)
    log.info("batch done", extra={"job_id": job.job_id, "priority": job.priority.value, "tasks": len(job.tasks),
                                  "ok": ok, "failed": len(job.tasks) - ok, "written": written,
                                  "write_queued": queued, "cached_queries": stats.cached_queries,
                                  "engine_queries": stats.engine_queries, "gpu_s": round(stats.gpu_seconds, 4),
                                  "image_s": round(stats.image_seconds, 4), "prefetched": prefetched})
    return {"job_id": job.job_id, "ok": ok, "failed": len(job.tasks) - ok, "written": written,
            "write_queued": queued}


def _finish(rt: Runtime, job: BatchJob, result: BatchResult, stats: BatchStats) -> None:
    """Finish a batch: record it (run progress, retries, the /metrics counters), then store its result.
    In this order, because a stored result is what answers ``/predict``: whoever sees the result sees
    the batch counted."""
    if callable(rt.on_batch_done):
        rt.on_batch_done(job, result, stats)
    rt.queue.store_result(result)


def write_entry(entry: Entry, rt: Runtime | None = None) -> int:
    """The background writer's work for one outbox entry: the Label Studio write (exactly once
    per task through the delivery claims), then the run's progress. Returns predictions written."""
    rt = rt or runtime()
    job, result = entry.job, entry.result
    written = rt.delivery.write(job.project_id, result)
    if callable(rt.on_batch_done):
        rt.on_batch_done(job, result, BatchStats(**entry.stats))
    log.info("batch written", extra={"job_id": job.job_id, "written": written, "tasks": len(job.tasks),
                                     "taken_over": entry.taken_over})
    return written


def _refuse_other_version(rt: Runtime, job: BatchJob) -> dict:
    """Queues are per version, so only a job pushed into the wrong queue gets here: it is never
    computed or written under this worker's name (nor its planner's); its tasks fail with the reason."""
    reason = (f"planned for model_version {job.model_version}, but it reached a worker serving "
              f"{rt.processor.model_version}; plan it again")
    result = BatchResult(job_id=job.job_id, model_version=job.model_version, worker=rt.processor.worker_name,
                         results=[TaskResult(task_id=t.task_id, ref=t.ref, status="failed", error=reason,
                                             error_kind=ErrorKind.version) for t in job.tasks])
    rt.queue.store_result(result)
    if job.run_id:
        RunStore(rt.queue.redis, rt.queue.prefix).record(job, result)
    log.error("refused a job of another model version", extra={"job_id": job.job_id, "expected": job.model_version,
                                                               "serving": rt.processor.model_version})
    return {"job_id": job.job_id, "ok": 0, "failed": len(job.tasks), "written": 0}
