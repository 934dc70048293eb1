"""Counters and histograms shared by every process through Redis.

Workers (and the webhook) add to them; the backend's ``/metrics`` renders them
in Prometheus text format. Keeping them in Redis means one scrape of the
backend shows the whole fleet, however many workers run.

Fields of the hash ``<prefix>:stats`` are ``name|label=value,...``; a histogram
``h`` has ``h_bucket|le=...``, ``h_sum`` and ``h_count`` fields.
"""

from __future__ import annotations

import time

import redis

from egm.contract import BatchJob, BatchResult
from egm.keys import Keys

#: throughput is counted in buckets of this many seconds, kept for an hour
RATE_BUCKET_S = 10
RATE_KEEP_S = 3600
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 900)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def field(name: str, **labels: str) -> str:
    if not labels:
        return name
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_field(raw: str) -> tuple[str, dict[str, str]]:
    name, _, rest = raw.partition("|")
    labels = dict(part.split("=", 1) for part in rest.split(",") if "=" in part) if rest else {}
    return name, labels


class StatsStore:
    def __init__(self, connection: redis.Redis, prefix: str) -> None:
        self.redis = connection
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.key = self.keys.stats()

    def _rate_key(self, bucket: int) -> str:
        return self.keys.rate(bucket)

    def count_finished(self, n: int, pipe=None, now: float | None = None) -> None:
        """Count finished tasks in a short time bucket (for the recent throughput)."""
        target = pipe if pipe is not None else self.redis
        key = self._rate_key(int((now or time.time()) // RATE_BUCKET_S))
        target.incrby(key, n)
        target.expire(key, RATE_KEEP_S)

    def recent_rate(self, window_s: float = 60.0, now: float | None = None) -> float:
        """Tasks per second finished by the whole fleet over the last ``window_s`` seconds."""
        now = now or time.time()
        current = int(now // RATE_BUCKET_S)
        n_buckets = max(1, int(window_s // RATE_BUCKET_S))
        buckets = range(current - n_buckets + 1, current + 1)
        counts = self.redis.mget([self._rate_key(b) for b in buckets])
        total = sum(int(c) for c in counts if c)
        span = (n_buckets - 1) * RATE_BUCKET_S + (now - current * RATE_BUCKET_S)
        return total / max(span, 1e-6)

    def incr(self, name: str, amount: float = 1, pipe=None, **labels: str) -> None:
        target = pipe if pipe is not None else self.redis
        target.hincrbyfloat(self.key, field(name, **labels), amount)

    def observe(self, name: str, value: float, buckets: tuple, pipe=None, **labels: str) -> None:
        target = pipe if pipe is not None else self.redis
        for le in buckets:
            if value <= le:
                target.hincrbyfloat(self.key, field(f"{name}_bucket", le=str(le), **labels), 1)
        target.hincrbyfloat(self.key, field(f"{name}_bucket", le="+Inf", **labels), 1)
        target.hincrbyfloat(self.key, field(f"{name}_sum", **labels), value)
        target.hincrbyfloat(self.key, field(f"{name}_count", **labels), 1)

    def record_batch(self, job: BatchJob, result: BatchResult, stats) -> None:
        prio = job.priority.value
        with self.redis.pipeline(transaction=False) as pipe:
            self.incr("egm_jobs_total", pipe=pipe, priority=prio)
            for r in result.results:
                self.incr("egm_tasks_total", pipe=pipe, priority=prio, status=r.status)
            self.count_finished(len(result.results), pipe=pipe)
            self.incr("egm_parse_failures_total", stats.parse_failures, pipe=pipe)
            self.incr("egm_cache_hits_total", stats.cached_queries, pipe=pipe)
            self.incr("egm_engine_queries_total", stats.engine_queries, pipe=pipe)
            self.observe("egm_batch_size", len(job.tasks), BATCH_BUCKETS, pipe=pipe, priority=prio)
            if stats.engine_queries:
                self.observe("egm_gpu_seconds", stats.gpu_seconds, LATENCY_BUCKETS, pipe=pipe)
            self.observe("egm_end_to_end_seconds", max(0.0, time.time() - job.created_at), LATENCY_BUCKETS,
                         pipe=pipe, priority=prio)
            pipe.execute()

    def snapshot(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.redis.hgetall(self.key).items()}
