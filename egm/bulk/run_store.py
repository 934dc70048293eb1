"""Bulk runs: progress counters and the failed-task list, readable by any process.

A run is one ``egm-assist prelabel`` source (a Label Studio project/view, a folder
or a manifest) at one ``model_version``; re-running the same command resumes it.
Workers update the run after each batch; ``egm-assist status RUN``, the CLI's
progress bar and ``/metrics`` read it.

Every task has one :class:`TaskStatus` in ``run:<id>:seen`` (``queued``, ``ok``, ``cached``,
``failed``, ``retrying``, ``skipped``), the run one :class:`RunState`, and the counters are moved by a Lua script from the old
status to the new one, so a batch that runs twice (a retry after a worker died)
never double counts, and recording a batch costs O(batch), not O(run).

Keys (all under ``<prefix>:run:<id>``): the hash itself (meta and counters),
``:seen``, ``:failed`` (task -> JSON reason), ``:assign`` (task -> job id of its
latest batch), ``:finished`` (list of finished job ids, in order), ``:spec``
(what the CLI needs to resume or retry the run), ``:lock`` (one planner at a time).

A run completes where its last task resolves, not only in a CLI that follows it: once the planner
has counted every task (``planned``), the worker that records the last batch flips ``running`` to
``done`` (``complete_if_done``, atomic, so exactly one caller does it and then finishes the run:
egm.bulk.completion). So ``prelabel --no-wait`` runs, and runs whose CLI died, read ``done``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable

import redis

from egm.contract import BatchJob, BatchResult, TaskResult
from egm.keys import Keys

RUN_TTL_S = 30 * 24 * 3600


class TaskStatus(StrEnum):
    """Where one task of a run stands (``run:<id>:seen``; the counters are ``n_<status>``)."""

    queued = "queued"
    ok = "ok"
    cached = "cached"
    failed = "failed"
    #: failed transiently; another try is scheduled (egm.bulk.retries).
    retrying = "retrying"
    #: already had a prediction of the run's model_version.
    skipped = "skipped"

    @property
    def succeeded(self) -> bool:
        return self in (TaskStatus.ok, TaskStatus.cached)


class RunState(StrEnum):
    """The run as a whole (``state`` of the run hash)."""

    running = "running"
    done = "done"
    cancelled = "cancelled"
    #: no such run (or a record without a state).
    unknown = "unknown"

# KEYS: seen hash, run hash. ARGV: ttl, mode ("set" | "skip"), then task/status pairs.
# "skip" never demotes a task that already succeeded in this run.
_RECORD_LUA = """
local changed = 0
for i = 3, #ARGV, 2 do
  local task, status = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[1], task)
  local keep = ARGV[2] == 'skip' and (old == 'ok' or old == 'cached')
  if old ~= status and not keep then
    redis.call('HSET', KEYS[1], task, status)
    if old then redis.call('HINCRBY', KEYS[2], 'n_' .. old, -1) end
    redis.call('HINCRBY', KEYS[2], 'n_' .. status, 1)
    changed = changed + 1
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'updated_at', now[1] + now[2] / 1000000)
return changed
"""

# KEYS: seen hash, run hash. ARGV: task keys to forget (tasks no longer in the source).
_FORGET_LUA = """
local n = 0
for i = 1, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HINCRBY', KEYS[2], 'n_' .. old, -1)
    n = n + 1
  end
end
return n
"""


# KEYS: run hash. Flips a planned, running run whose every task is resolved to "done"; 1 when this call did it.
_COMPLETE_LUA = """
local d = redis.call('HMGET', KEYS[1], 'state', 'planned', 'total', 'n_ok', 'n_cached', 'n_failed', 'n_skipped',
                     'n_retrying')
if d[1] ~= 'running' or d[2] ~= '1' then return 0 end
local function n(x) return tonumber(x or '0') or 0 end
local resolved = n(d[4]) + n(d[5]) + n(d[6]) + n(d[7])
if n(d[8]) > 0 or resolved < n(d[3]) then return 0 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'state', 'done', 'updated_at', now[1] + now[2] / 1000000)
return 1
"""


def _run_state(raw: str | None) -> RunState:
    try:
        return RunState(raw)
    except ValueError:
        return RunState.unknown


def task_key(task_id: int | None, ref: str | None) -> str:
    """How a run names a task: its Label Studio id, else its reference (path, URL, manifest key)."""
    return str(task_id) if task_id is not None else str(ref)


def result_status(result: TaskResult) -> TaskStatus:
    if result.status != "ok":
        return TaskStatus.failed
    return TaskStatus.cached if result.cached else TaskStatus.ok


@dataclass
class RunProgress:
    run_id: str
    total: int = 0
    enqueued: int = 0
    done: int = 0
    failed: int = 0
    cached: int = 0
    skipped: int = 0
    retrying: int = 0
    #: enqueued and not finished yet.
    queued: int = 0
    state: RunState = RunState.unknown
    started_at: float = 0.0
    updated_at: float = 0.0
    model_version: str = ""
    source: str = ""
    #: when this invocation (re)started the run, and how many tasks were resolved then (for the rate).
    resumed_at: float = 0.0
    resolved_at_resume: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def resolved(self) -> int:
        """Tasks that need nothing more: predicted, failed for good or skipped."""
        return self.done + self.failed + self.skipped

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.resolved)

    @property
    def rate(self) -> float:
        """Tasks per second since this invocation started."""
        start = self.resumed_at or self.started_at
        if not start:
            return 0.0
        elapsed = max(1e-6, (self.updated_at or time.time()) - start)
        return max(0, self.resolved - self.resolved_at_resume) / elapsed

    @property
    def eta_s(self) -> float | None:
        return self.remaining / self.rate if self.rate > 0 else None

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out.update(finished=self.finished, resolved=self.resolved, remaining=self.remaining,
                   rate=round(self.rate, 3), eta_s=None if self.eta_s is None else round(self.eta_s, 1))
        return out


class RunStore:
    def __init__(self, connection: redis.Redis, prefix: str) -> None:
        self.redis = connection
        self.prefix = prefix
        self.keys = Keys(prefix)
        self._record = connection.register_script(_RECORD_LUA)
        self._forget = connection.register_script(_FORGET_LUA)
        self._complete = connection.register_script(_COMPLETE_LUA)

    def key(self, run_id: str, part: str | None = None) -> str:
        """``run:<id>`` or one of its parts (egm.keys.RUN_PARTS)."""
        return self.keys.run(run_id, part)

    # -- lifecycle -------------------------------------------------------------------
    def create(self, run_id: str, *, total: int, model_version: str, source: str, spec: dict | None = None,
               switch_project_version: bool = True) -> None:
        """Start or resume a run: state ``running``, not planned yet, this invocation's counters reset.
        ``switch_project_version``: whoever completes the run makes its Label Studio project show this version."""
        now = time.time()
        resolved = self.progress(run_id)
        mapping = {"total": total, "model_version": model_version, "source": source, "updated_at": now,
                   "resumed_at": now, "resolved_at_resume": resolved.resolved if resolved else 0,
                   "enqueued": 0, "state": RunState.running.value, "planned": 0,
                   "switch_project_version": int(bool(switch_project_version))}
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(self.key(run_id), "started_at", now)
            pipe.hset(self.key(run_id), mapping=mapping)
            pipe.sadd(self.keys.runs(), run_id)
            pipe.expire(self.key(run_id), RUN_TTL_S)
            if spec is not None:
                pipe.set(self.key(run_id, "spec"), json.dumps(spec), ex=RUN_TTL_S)
            pipe.execute()

    def set_total(self, run_id: str, total: int) -> None:
        self.redis.hset(self.key(run_id), mapping={"total": total, "updated_at": time.time()})

    def add_enqueued(self, run_id: str, n: int, skipped: int = 0) -> None:
        self.redis.hincrby(self.key(run_id), "enqueued", n)

    def set_planned(self, run_id: str) -> None:
        """Every task of the source is counted in ``total``: the run can complete once they are resolved."""
        self.redis.hset(self.key(run_id), mapping={"planned": 1, "updated_at": time.time()})

    def complete_if_done(self, run_id: str) -> bool:
        """Mark a planned, running run ``done`` when no task is left or retrying. True only for the one
        caller that made the change (a worker after the last batch, the planner, the following CLI)."""
        return bool(self._complete(keys=[self.key(run_id)]))

    def switches_project_version(self, run_id: str) -> bool:
        return self.redis.hget(self.key(run_id), "switch_project_version") != b"0"

    def set_state(self, run_id: str, state: RunState) -> None:
        self.redis.hset(self.key(run_id), mapping={"state": RunState(state).value, "updated_at": time.time()})

    def state(self, run_id: str) -> RunState | None:
        raw = self.redis.hget(self.key(run_id), "state")
        return _run_state(raw.decode()) if raw else None

    def is_cancelled(self, run_id: str | None) -> bool:
        return bool(run_id) and self.state(run_id) == RunState.cancelled

    def spec(self, run_id: str) -> dict | None:
        raw = self.redis.get(self.key(run_id, "spec"))
        return json.loads(raw) if raw else None

    # -- per-task status ----------------------------------------------------------------
    def mark(self, run_id: str, statuses: dict[str, TaskStatus], *, skip_mode: bool = False) -> int:
        """Set task statuses (moving the counters); returns how many changed."""
        if not statuses:
            return 0
        args: list[str | int] = [RUN_TTL_S, "skip" if skip_mode else "set"]
        for task, status in statuses.items():
            try:
                args.extend((task, TaskStatus(status).value))
            except ValueError:
                raise ValueError(f"unknown task status {status!r}") from None
        return int(self._record(keys=[self.key(run_id, "seen"), self.key(run_id)], args=args))

    def mark_skipped(self, run_id: str, task_keys: Iterable[str]) -> int:
        """Tasks that already have a prediction of this run's model_version (kept ``ok`` if this run made it)."""
        return self.mark(run_id, {k: TaskStatus.skipped for k in task_keys}, skip_mode=True)

    def forget(self, run_id: str, task_keys: Iterable[str]) -> int:
        """Drop tasks that left the source (files removed, tasks deleted) so the counters match it."""
        keys = list(task_keys)
        if not keys:
            return 0
        n = int(self._forget(keys=[self.key(run_id, "seen"), self.key(run_id)], args=keys))
        self.redis.hdel(self.key(run_id, "failed"), *keys)
        return n

    def statuses(self, run_id: str, task_keys: list[str] | None = None) -> dict[str, TaskStatus]:
        """Status of the given tasks (all tasks of the run when ``None``); unknown tasks are absent."""
        seen = self.key(run_id, "seen")
        if task_keys is None:
            return {k.decode(): TaskStatus(v.decode()) for k, v in self.redis.hgetall(seen).items()}
        if not task_keys:
            return {}
        values = self.redis.hmget(seen, task_keys)
        return {k: TaskStatus(v.decode()) for k, v in zip(task_keys, values) if v is not None}

    def record(self, job: BatchJob, result: BatchResult, retrying: Iterable[str] = ()) -> None:
        """Count a finished batch. ``retrying``: task keys of failures scheduled for another try."""
        if not job.run_id:
            return
        run, retry = job.run_id, set(retrying)
        images = {task_key(t.task_id, t.ref): t.image for t in job.tasks}
        statuses: dict[str, TaskStatus] = {}
        failed_items: dict[str, str] = {}
        for r in result.results:
            key = task_key(r.task_id, r.ref)
            status = TaskStatus.retrying if key in retry and r.status != "ok" else result_status(r)
            statuses[key] = status
            if status == TaskStatus.failed:
                failed_items[key] = json.dumps({"task_id": r.task_id, "ref": r.ref, "error": r.error,
                                                "kind": r.error_kind, "image": images.get(key),
                                                "job_id": job.job_id, "at": time.time()})
        cleared = [k for k, s in statuses.items() if s != TaskStatus.failed]
        self.mark(run, statuses)
        with self.redis.pipeline(transaction=False) as pipe:
            if cleared:
                pipe.hdel(self.key(run, "failed"), *cleared)
            if failed_items:
                pipe.hset(self.key(run, "failed"), mapping=failed_items)
                pipe.expire(self.key(run, "failed"), RUN_TTL_S)
            pipe.rpush(self.key(run, "finished"), job.job_id)
            pipe.expire(self.key(run, "finished"), RUN_TTL_S)
            pipe.execute()

    def record_failure(self, run_id: str, items: list[dict]) -> None:
        """Fail tasks outside a worker (a batch job RQ gave up on): ``{task_id, ref, error, kind, image}``."""
        if not items:
            return
        failed = {task_key(i.get("task_id"), i.get("ref")): json.dumps({**i, "at": time.time()}) for i in items}
        self.mark(run_id, {k: TaskStatus.failed for k in failed})
        self.redis.hset(self.key(run_id, "failed"), mapping=failed)
        self.redis.expire(self.key(run_id, "failed"), RUN_TTL_S)

    def mark_queued(self, run_id: str, task_keys: list[str]) -> None:
        """Tasks just enqueued: pending again, whatever they were (a retried failure is no longer failed)."""
        if task_keys:
            self.mark(run_id, {k: TaskStatus.queued for k in task_keys})
            self.redis.hdel(self.key(run_id, "failed"), *task_keys)

    # -- batches ------------------------------------------------------------------------
    def assign(self, run_id: str, job: BatchJob) -> None:
        """Remember which job carries each task (written before the job is enqueued)."""
        mapping = {task_key(t.task_id, t.ref): job.job_id for t in job.tasks}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(run_id, "assign"), mapping=mapping)
            pipe.expire(self.key(run_id, "assign"), RUN_TTL_S)
            pipe.execute()

    def assignments(self, run_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(self.key(run_id, "assign")).items()}

    def finished_jobs(self, run_id: str, start: int = 0) -> list[str]:
        """Finished job ids from position ``start`` of the run's log (read it incrementally)."""
        return [j.decode() for j in self.redis.lrange(self.key(run_id, "finished"), start, -1)]

    # -- reading ------------------------------------------------------------------------
    def progress(self, run_id: str) -> RunProgress | None:
        raw = self.redis.hgetall(self.key(run_id))
        if not raw:
            return None
        d = {k.decode(): v.decode() for k, v in raw.items()}

        def n(name: str) -> int:
            return int(float(d.get(name, 0) or 0))

        return RunProgress(
            run_id=run_id, total=n("total"), enqueued=n("enqueued"), done=n("n_ok") + n("n_cached"),
            failed=n("n_failed"), cached=n("n_cached"), skipped=n("n_skipped"), retrying=n("n_retrying"),
            queued=n("n_queued"),
            state=_run_state(d.get("state")), started_at=float(d.get("started_at", 0)),
            updated_at=float(d.get("updated_at", 0)), model_version=d.get("model_version", ""),
            source=d.get("source", ""), resumed_at=float(d.get("resumed_at", 0) or 0),
            resolved_at_resume=n("resolved_at_resume"))

    def failed(self, run_id: str) -> list[dict]:
        items = [json.loads(v) for v in self.redis.hvals(self.key(run_id, "failed"))]
        return sorted(items, key=lambda i: (i.get("task_id") is None, i.get("task_id") or 0, i.get("ref") or ""))

    def runs(self) -> list[str]:
        return sorted(x.decode() for x in self.redis.smembers(self.keys.runs()))

    # -- one planner at a time ----------------------------------------------------------------
    def acquire_lock(self, run_id: str, owner: str, ttl_s: int = 120) -> bool:
        return bool(self.redis.set(self.key(run_id, "lock"), owner, nx=True, ex=ttl_s))

    def refresh_lock(self, run_id: str, owner: str, ttl_s: int = 120) -> bool:
        key = self.key(run_id, "lock")
        if self.redis.get(key) != owner.encode():
            return False
        return bool(self.redis.expire(key, ttl_s))

    def release_lock(self, run_id: str, owner: str) -> None:
        key = self.key(run_id, "lock")
        if self.redis.get(key) == owner.encode():
            self.redis.delete(key)

    def lock_owner(self, run_id: str) -> str | None:
        raw = self.redis.get(self.key(run_id, "lock"))
        return raw.decode() if raw else None
