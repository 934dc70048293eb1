"""Bulk predictions off the GPU's path: a crash-safe outbox in Redis and a background writer.

Writing a bulk job's predictions to Label Studio (one import request: 0.15-0.4 s, much longer
while Label Studio is slow or down) used to sit between two engine calls. Now the job stores
its result, files a write entry here and returns, and the worker takes its next batch while
a writer thread does the import and the run's bookkeeping.

Crash safety: the entry (the job, its whole result and stats) is in Redis before the job
returns, so once RQ counts the job done nothing lives only in a worker's memory. Entries sit
in a sorted set scored by lease expiry: a writer leases a due entry (score = now + lease,
atomically, with a token), renews the lease while it waits on Label Studio, and deletes the
entry after the write and the bookkeeping. A writer that dies (SIGKILL, lost machine) stops
renewing; when the lease runs out any worker's writer takes the entry over.

Exactly once: an entry can be written twice (taken over after a write that in fact landed,
or filed again by an RQ retry of a job that died after filing it), so writes go through the
per-task claims of :mod:`egm.worker.delivery` with the job id as owner: a claim the same owner
left pending is verified against Label Studio before anything is written again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import redis

from egm.contract import BatchJob, BatchResult
from egm.keys import Keys

log = logging.getLogger(__name__)

#: an entry outlives any plausible outage; Label Studio writes give up long before
ENTRY_TTL_S = 7 * 24 * 3600

# Lease the first due entry. KEYS: outbox zset, lease hash. ARGV: now, lease until, token.
_LEASE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #ids == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[2], ids[1])
redis.call('HSET', KEYS[2], ids[1], ARGV[3])
return ids[1]
"""
# Extend a lease still held with this token. KEYS: zset, lease hash. ARGV: id, until, token.
_RENEW_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return 0 end
return redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[1]) + 1
"""
# Drop a written entry if this token still holds it. KEYS: zset, lease hash, entry. ARGV: id, token.
_DONE_LUA = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass
class Entry:
    job: BatchJob
    result: BatchResult
    stats: dict
    token: str
    taken_over: bool = False


class Outbox:
    """The Redis side: file, lease, renew, finish."""

    def __init__(self, connection: redis.Redis, prefix: str, lease_s: float) -> None:
        self.redis = connection
        self.prefix = prefix
        self.lease_s = lease_s
        self.keys = Keys(prefix)
        self._zset = self.keys.outbox()
        self._leases = self.keys.outbox_lease()
        self._lease = connection.register_script(_LEASE_LUA)
        self._renew = connection.register_script(_RENEW_LUA)
        self._done = connection.register_script(_DONE_LUA)

    def _entry_key(self, job_id: str) -> str:
        return self.keys.outbox_entry(job_id)

    def file(self, job: BatchJob, result: BatchResult, stats: dict) -> None:
        """Durably queue the write of ``result`` (one transaction: entry and schedule together)."""
        body = json.dumps({"job": job.model_dump(mode="json"), "result": result.model_dump(mode="json"),
                           "stats": stats, "filed_at": time.time()})
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._entry_key(job.job_id), body, ex=ENTRY_TTL_S)
            pipe.zadd(self._zset, {job.job_id: 0})
            pipe.hdel(self._leases, job.job_id)  # filed again by a retried job: due now, any writer
            pipe.execute()

    def lease(self, now: float | None = None) -> Entry | None:
        """Take the first due entry for ``lease_s`` seconds, or None."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        job_id = self._lease(keys=[self._zset, self._leases], args=[now, now + self.lease_s, token])
        if job_id is None:
            return None
        job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
        raw = self.redis.get(self._entry_key(job_id))
        if raw is None:  # expired or finished meanwhile: nothing left to write
            self.redis.zrem(self._zset, job_id)
            self.redis.hdel(self._leases, job_id)
            return None
        body = json.loads(raw)
        return Entry(job=BatchJob.model_validate(body["job"]), result=BatchResult.model_validate(body["result"]),
                     stats=body.get("stats") or {}, token=token)

    def renew(self, entry: Entry) -> bool:
        """Extend the lease; False when it was lost (another writer took the entry over)."""
        until = time.time() + self.lease_s
        return bool(self._renew(keys=[self._zset, self._leases], args=[entry.job.job_id, until, entry.token]))

    def finish(self, entry: Entry) -> bool:
        """Remove a written entry; False if another writer holds it now (it then writes it again,
        which the delivery claims make harmless)."""
        keys = [self._zset, self._leases, self._entry_key(entry.job.job_id)]
        return bool(self._done(keys=keys, args=[entry.job.job_id, entry.token]))

    def pending(self, job_ids: list[str] | None = None) -> int:
        """Entries waiting or being written (of ``job_ids`` only, when given)."""
        if job_ids is None:
            return int(self.redis.zcard(self._zset))
        if not job_ids:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zscore(self._zset, job_id)
            return sum(score is not None for score in pipe.execute())

    @contextmanager
    def keep_leased(self, entry: Entry) -> Iterator[threading.Event]:
        """Renew the lease every third of it while the body runs; the event is set if it was lost."""
        lost, stop = threading.Event(), threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.renew(entry):
                        lost.set()
                        return
                except redis.RedisError:
                    pass  # Redis away: the lease may lapse; a takeover writes again, claims dedupe

        thread = threading.Thread(target=renew, name="egm-outbox-lease", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join(timeout=1)


WriteFn = Callable[[Entry], None]


class BackgroundWriter:
    """One thread per worker that empties the outbox: this worker's entries as soon as they are
    filed, anyone's whose lease ran out (their writer died) within ``poll_s``."""

    def __init__(self, outbox: Outbox, write: WriteFn, *, max_pending: int = 4, poll_s: float = 1.0) -> None:
        self.outbox = outbox
        self.write = write
        self.max_pending = max(1, max_pending)
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mine: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self.written = 0

    def start(self) -> "BackgroundWriter":
        self._thread = threading.Thread(target=self._run, name="egm-writer", daemon=True)
        self._thread.start()
        return self

    def file(self, job: BatchJob, result: BatchResult, stats: dict, wait_s: float = 3600.0) -> None:
        """Queue a write; first wait while ``max_pending`` of this worker's writes are unfinished
        (Label Studio slower than the GPU: the worker slows down instead of piling results up)."""
        deadline = time.monotonic() + wait_s
        while self._unfinished() >= self.max_pending and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self.outbox.file(job, result, stats)
        self._mine.append(job.job_id)
        self._wake.set()

    def drain(self, timeout_s: float) -> bool:
        """Wait until this worker's writes are done (a stopping worker); True if they are."""
        deadline = time.monotonic() + timeout_s
        while self._unfinished() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        return not self._unfinished()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _unfinished(self) -> int:
        try:
            n = self.outbox.pending(list(self._mine))
        except redis.RedisError:
            return len(self._mine)
        if n == 0:
            self._mine.clear()
        return n

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                entry = self.outbox.lease()
            except redis.RedisError as exc:
                log.warning("outbox unreachable", extra={"error": str(exc)})
                entry = None
            if entry is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self._write(entry)

    def _write(self, entry: Entry) -> None:
        job_id = entry.job.job_id
        if job_id not in self._mine:
            entry.taken_over = True
            log.info("outbox: writing an entry another worker filed", extra={"job_id": job_id})
        try:
            with self.outbox.keep_leased(entry):
                self.write(entry)
            if self.outbox.finish(entry):
                self.written += 1
        except Exception:  # noqa: BLE001 - the entry stays; its lease runs out and it is tried again
            log.exception("outbox write failed; retrying after the lease", extra={"job_id": job_id})
