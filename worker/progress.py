"""After-batch bookkeeping in the worker: bulk-run progress and shared counters for /metrics."""

from __future__ import annotations

from egm.contract import BatchJob, BatchResult
from egm.queue import QueueClient
from egm.runs import RunStore
from egm.stats import StatsStore


def record_batch(queue: QueueClient, job: BatchJob, result: BatchResult, stats) -> None:
    RunStore(queue.redis, queue.prefix).record(job, result)
    StatsStore(queue.redis, queue.prefix).record_batch(job, result, stats)
