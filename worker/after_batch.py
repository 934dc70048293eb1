"""After-batch bookkeeping in the worker: bulk-run progress, task retries and shared counters for /metrics."""

from __future__ import annotations

import logging

from egm.bulk.retries import RetryScheduler
from egm.contract import BatchJob, BatchResult
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from egm.stats import StatsStore

log = logging.getLogger(__name__)


def record_batch(queue: QueueClient, job: BatchJob, result: BatchResult, stats) -> None:
    retries = RetryScheduler(queue)
    # Transient failures of a bulk run get another try later; they count as "retrying", not failed.
    retrying = retries.schedule(job, result) if job.run_id else set()
    RunStore(queue.redis, queue.prefix).record(job, result, retrying)
    StatsStore(queue.redis, queue.prefix).record_batch(job, result, stats)
    try:
        retries.promote_due()
    except Exception:  # noqa: BLE001 - promotion is best effort; the CLI and other workers promote too
        log.warning("promoting due retries failed", exc_info=True)
