"""After-batch bookkeeping in the worker: bulk-run progress, task retries and shared counters for /metrics."""

from __future__ import annotations

import logging

from egm.bulk.completion import finish_if_done
from egm.bulk.retries import RetryScheduler
from egm.contract import BatchJob, BatchResult
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from egm.stats import StatsStore

log = logging.getLogger(__name__)


def record_batch(queue: QueueClient, job: BatchJob, result: BatchResult, stats, ls_client=None,
                 basic_auth_pass: str | None = None) -> None:
    retries = RetryScheduler(queue)
    # Transient failures of a bulk run get another try later; they count as "retrying", not failed.
    retrying = retries.schedule(job, result) if job.run_id else set()
    runs = RunStore(queue.redis, queue.prefix)
    runs.record(job, result, retrying)
    # The last batch of a run completes it here, whether or not a CLI still follows it.
    finish_if_done(runs, job.run_id, ls_client, basic_auth_pass)
    StatsStore(queue.redis, queue.prefix).record_batch(job, result, stats)
    try:
        retries.promote_due()
    except Exception:  # noqa: BLE001 - promotion is best effort; the CLI and other workers promote too
        log.warning("promoting due retries failed", exc_info=True)
