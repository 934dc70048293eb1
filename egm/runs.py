"""Bulk runs: progress counters and the failed-task list, readable by any process.

A run is one ``egm-assist prelabel`` invocation (or its resumption). Workers
update the counters after each batch; ``egm-assist status RUN``, the CLI's
progress bar and ``/metrics`` read them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from egm.contract import BatchJob, BatchResult, redis_key

RUN_TTL_S = 30 * 24 * 3600


@dataclass
class RunProgress:
    run_id: str
    total: int = 0
    enqueued: int = 0
    done: int = 0
    failed: int = 0
    cached: int = 0
    skipped: int = 0
    state: str = "unknown"
    started_at: float = 0.0
    updated_at: float = 0.0
    model_version: str = ""
    source: str = ""

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        elapsed = max(1e-6, (self.updated_at or time.time()) - self.started_at)
        return self.finished / elapsed if self.started_at else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.enqueued - self.finished
        return left / self.rate if self.rate > 0 and left >= 0 else None


class RunStore:
    def __init__(self, connection: redis.Redis, prefix: str) -> None:
        self.redis = connection
        self.prefix = prefix

    def key(self, run_id: str, *parts: str) -> str:
        return redis_key(self.prefix, "run", run_id, *parts)

    def create(self, run_id: str, *, total: int, model_version: str, source: str) -> None:
        now = time.time()
        mapping = {"total": total, "model_version": model_version, "source": source, "updated_at": now}
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(self.key(run_id), "started_at", now)
            pipe.hset(self.key(run_id), mapping=mapping)
            pipe.hset(self.key(run_id), "state", "running")
            pipe.sadd(redis_key(self.prefix, "runs"), run_id)
            pipe.expire(self.key(run_id), RUN_TTL_S)
            pipe.execute()

    def add_enqueued(self, run_id: str, n: int, skipped: int = 0) -> None:
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.key(run_id), "enqueued", n)
            pipe.hincrby(self.key(run_id), "skipped", skipped)
            pipe.execute()

    def set_state(self, run_id: str, state: str) -> None:
        self.redis.hset(self.key(run_id), mapping={"state": state, "updated_at": time.time()})

    def record(self, job: BatchJob, result: BatchResult) -> None:
        """Count a finished batch. A task counts once even if its batch ran twice (retry after a crash)."""
        if not job.run_id:
            return
        run = job.run_id
        seen_key = self.key(run, "seen")
        with self.redis.pipeline() as pipe:
            for r in result.results:
                task_key = str(r.task_id if r.task_id is not None else r.ref)
                pipe.hset(seen_key, task_key, r.status)
            pipe.expire(seen_key, RUN_TTL_S)
            pipe.execute()
        done = failed = cached = 0
        failed_items = {}
        for r in result.results:
            if r.status == "ok":
                done += 1
                cached += int(r.cached)
            else:
                failed += 1
                failed_items[str(r.task_id if r.task_id is not None else r.ref)] = json.dumps(
                    {"task_id": r.task_id, "ref": r.ref, "error": r.error, "kind": r.error_kind,
                     "image": next((t.image for t in job.tasks
                                    if t.task_id == r.task_id and t.ref == r.ref), None)})
        ok_keys = [str(r.task_id if r.task_id is not None else r.ref) for r in result.results if r.status == "ok"]
        with self.redis.pipeline() as pipe:
            if ok_keys:
                pipe.hdel(self.key(run, "failed"), *ok_keys)
            if failed_items:
                pipe.hset(self.key(run, "failed"), mapping=failed_items)
                pipe.expire(self.key(run, "failed"), RUN_TTL_S)
            pipe.execute()
        # Recompute totals from the per-task map so a retried batch never double counts.
        statuses = self.redis.hvals(seen_key)
        n_ok = sum(s == b"ok" for s in statuses)
        self.redis.hset(self.key(run), mapping={"done": n_ok, "failed": len(statuses) - n_ok,
                                                "updated_at": time.time()})
        if cached:
            self.redis.hincrby(self.key(run), "cached", cached)

    def progress(self, run_id: str) -> RunProgress | None:
        raw = self.redis.hgetall(self.key(run_id))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}
        ints = {k: int(float(d.get(k, 0))) for k in ("total", "enqueued", "done", "failed", "cached", "skipped")}
        return RunProgress(run_id=run_id, **ints, state=d.get("state", "unknown"),
                           started_at=float(d.get("started_at", 0)), updated_at=float(d.get("updated_at", 0)),
                           model_version=d.get("model_version", ""), source=d.get("source", ""))

    def failed(self, run_id: str) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(self.key(run_id, "failed"))]

    def runs(self) -> list[str]:
        return sorted(x.decode() for x in self.redis.smembers(redis_key(self.prefix, "runs")))
