"""The function RQ runs for every batch job (``egm.contract.BATCH_FUNC``).

It runs inside the long-lived worker process, which installs a :class:`Runtime`
once at start-up (engine loaded, connections open); jobs only reference it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from egm.contract import BatchJob
from egm.queue import QueueClient
from worker.delivery import LabelStudioWriter
from worker.pipeline import BatchProcessor

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    processor: BatchProcessor
    queue: QueueClient
    writer: LabelStudioWriter
    #: optional hook called with (job, result, stats) after each batch (progress counters, metrics).
    on_batch_done: object | None = None


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
    result = rt.processor.process(job)
    stats = rt.processor.last_stats
    rt.queue.store_result(result)
    written = 0
    if job.write_to_label_studio:
        written = _write(rt, job, result)
    elif job.deliver_late and rt.queue.worker_must_deliver(job.job_id):
        if rt.writer.client is None:
            log.warning("late result kept in Redis only: no Label Studio credentials configured",
                        extra={"job_id": job.job_id})
        else:
            written = _write(rt, job, result)
    if callable(rt.on_batch_done):
        rt.on_batch_done(job, result, stats)
    ok = sum(r.status == "ok" for r in result.results)
    log.info("batch done", extra={"job_id": job.job_id, "priority": job.priority.value, "tasks": len(job.tasks),
                                  "ok": ok, "failed": len(job.tasks) - ok, "written": written,
                                  "cached_queries": stats.cached_queries, "engine_queries": stats.engine_queries,
                                  "gpu_s": round(stats.gpu_seconds, 4)})
    return {"job_id": job.job_id, "ok": ok, "failed": len(job.tasks) - ok, "written": written}


def _write(rt: Runtime, job: BatchJob, result) -> int:
    """Write the batch's predictions; a prediction Label Studio refuses fails that task only."""
    report = rt.writer.write(job.project_id, result.results, job.model_version)
    for r in result.results:
        if r.task_id in report.refused:
            r.status, r.error_kind = "failed", "label_studio"
            r.error = f"Label Studio refused the prediction: {report.refused[r.task_id]}"
    if report.refused:
        rt.queue.store_result(result)
    return len(report.written)
