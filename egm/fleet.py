"""The fleet registry: which workers are alive, which ``model_version`` each serves, where new work goes.

Every worker publishes a record under ``fleet:worker:<name>`` (JSON, with a TTL of three
heartbeats + 10 s) from a thread that beats while the process lives, idle or busy:

* ``starting`` as soon as Redis answers, before the model loads (a load can take minutes);
* ``ready`` with its :class:`~egm.identity.ModelIdentity` once the engine is up;
* ``failed`` with the reason when start-up fails, kept ``FAILED_TTL_S`` so a command that started
  the worker can print that reason; the record is deleted on a clean exit.

``fleet:versions:first`` / ``:last`` remember when each version was first and last served.

**Which version planners use** (:meth:`FleetView.current_version`), the documented policy:
only live ``ready`` workers count; one version -> it; several (a rolling upgrade) -> the one
first seen most recently, so new work goes to the new model and a restarted old worker does not
flip it back; none -> :class:`NoLiveWorker` with a message that says what to start and what was
last seen. A planner may pin a version it already names (``prelabel --model-version``); it is
refused unless a live worker serves it. Times are Redis server time, so machines agree.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis
from pydantic import BaseModel, Field

from egm.config.settings import Settings
from egm.keys import Keys
from egm.identity import prompt_setup

#: a failed worker's record outlives it this long (its reason is what a user needs to read).
FAILED_TTL_S = 300
#: versions not served for this long are forgotten (a later return counts as new).
VERSION_MEMORY_S = 30 * 24 * 3600


class WorkerState(str, Enum):
    starting = "starting"
    ready = "ready"
    failed = "failed"


class WorkerRecord(BaseModel):
    worker: str
    state: WorkerState
    engine: str = ""
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    ready_at: float | None = None
    model_version: str | None = None
    #: :meth:`ModelIdentity.summary` of a ready worker.
    identity: dict[str, Any] = Field(default_factory=dict)
    #: :func:`egm.identity.prompt_setup` the version was computed with (planners must match it).
    prompts: dict[str, str] = Field(default_factory=dict)
    reason: str | None = None


class FleetError(RuntimeError):
    """No worker can take the work as asked; the message says what to do."""


class NoLiveWorker(FleetError):
    pass


class VersionNotServed(FleetError):
    pass


class PromptMismatch(FleetError):
    pass


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


@dataclass
class FleetView:
    """One consistent read of the registry."""

    workers: list[WorkerRecord]
    first_seen: dict[str, float]
    last_seen: dict[str, float]
    now: float
    #: version -> prompt setup it was computed with.
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)

    def by_state(self, state: WorkerState) -> list[WorkerRecord]:
        return [w for w in self.workers if w.state == state]

    @property
    def ready(self) -> list[WorkerRecord]:
        return self.by_state(WorkerState.ready)

    def live_versions(self) -> dict[str, list[WorkerRecord]]:
        """Version -> its live ready workers."""
        out: dict[str, list[WorkerRecord]] = {}
        for w in self.ready:
            out.setdefault(w.model_version or "", []).append(w)
        out.pop("", None)
        return out

    def current_version(self) -> str:
        """The version new work goes to (see the module docstring for the policy)."""
        live = self.live_versions()
        if not live:
            raise NoLiveWorker(self.no_worker_message())
        return max(live, key=lambda v: (self.first_seen.get(v, self.now), v))

    def no_worker_message(self) -> str:
        parts = ["no worker is serving a model: start one with `egm-assist worker` (one per GPU, same REDIS_URL "
                 "and EGM_QUEUE_PREFIX)"]
        starting = self.by_state(WorkerState.starting)
        if starting:
            parts.append(f"{len(starting)} worker(s) still loading their model ("
                         + ", ".join(f"{w.worker} since {ago(self.now - w.started_at)}" for w in starting) + ")")
        for w in self.by_state(WorkerState.failed):
            parts.append(f"worker {w.worker} failed to start: {w.reason}")
        if self.last_seen:
            version, when = max(self.last_seen.items(), key=lambda kv: kv[1])
            parts.append(f"last seen: {version} {ago(self.now - when)}")
        return "; ".join(parts)

    def version_for_planning(self, settings: Settings, pinned: str | None = None) -> str:
        """The version to plan new work for: the current one, or ``pinned`` if a live worker serves it;
        refused when this process would build other prompts than the version was computed with."""
        live = self.live_versions()
        if pinned:
            if pinned not in live:
                serving = ", ".join(sorted(live)) or "nothing (no live worker)"
                raise VersionNotServed(f"no live worker serves model_version {pinned}; live workers serve "
                                       f"{serving}")
            version = pinned
        else:
            version = self.current_version()
        theirs, mine = self.prompts.get(version), prompt_setup(settings)
        if theirs and theirs != mine:
            raise PromptMismatch(
                f"the workers serving {version} were started with other prompts (EGM_PROMPT_MODE {theirs.get('mode')}, "
                f"templates {theirs.get('templates', '')[:12]}) than this process (EGM_PROMPT_MODE {mine['mode']}, "
                f"templates {mine['templates'][:12]}): give the backend, the CLI and the workers the same "
                f"EGM_PROMPT_MODE and EGM_PROMPT_DIR")
        return version


class Fleet:
    def __init__(self, connection: redis.Redis, prefix: str, heartbeat_s: float = 5.0) -> None:
        self.redis = connection
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.heartbeat_s = heartbeat_s

    @classmethod
    def from_settings(cls, settings: Settings, connection: redis.Redis) -> "Fleet":
        return cls(connection, settings.queue_prefix, settings.heartbeat_s)

    @property
    def ttl_s(self) -> int:
        """A record outlives its worker's last beat this long: the same rule RQ applies to a busy worker."""
        return int(self.heartbeat_s * 3 + 10)

    def now(self) -> float:
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    # -- the worker's side ---------------------------------------------------------------
    def publish(self, record: WorkerRecord) -> None:
        now = self.now()
        record.heartbeat_at = now
        ttl = FAILED_TTL_S if record.state == WorkerState.failed else self.ttl_s
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.fleet_worker(record.worker), record.model_dump_json(), ex=ttl)
            pipe.sadd(self.keys.fleet_workers(), record.worker)
            if record.state == WorkerState.ready and record.model_version:
                pipe.hsetnx(self.keys.fleet_versions("first"), record.model_version, repr(now))
                pipe.hset(self.keys.fleet_versions("last"), record.model_version, repr(now))
                pipe.hset(self.keys.fleet_versions("prompts"), record.model_version, json.dumps(record.prompts))
            pipe.execute()

    def remove(self, name: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.fleet_worker(name))
            pipe.srem(self.keys.fleet_workers(), name)
            pipe.execute()

    # -- everyone's side ------------------------------------------------------------------
    def view(self) -> FleetView:
        names = sorted(n.decode() for n in self.redis.smembers(self.keys.fleet_workers()))
        raws = self.redis.mget([self.keys.fleet_worker(n) for n in names]) if names else []
        workers, gone = [], []
        for name, raw in zip(names, raws):
            if raw is None:
                gone.append(name)  # its TTL ran out: it died without a goodbye
                continue
            try:
                workers.append(WorkerRecord.model_validate_json(raw))
            except ValueError:
                gone.append(name)
        if gone:
            self.redis.srem(self.keys.fleet_workers(), *gone)
        now = self.now()
        first = _floats(self.redis.hgetall(self.keys.fleet_versions("first")))
        last = _floats(self.redis.hgetall(self.keys.fleet_versions("last")))
        stale = [v for v, t in last.items() if now - t > VERSION_MEMORY_S]
        if stale:
            for part in ("first", "last", "prompts"):
                self.redis.hdel(self.keys.fleet_versions(part), *stale)
            for v in stale:
                first.pop(v, None)
                last.pop(v, None)
        prompts = {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.keys.fleet_versions("prompts")).items()}
        return FleetView(workers=workers, first_seen=first, last_seen=last, now=now, prompts=prompts)

    def current_version(self) -> str:
        return self.view().current_version()

    def version_for_planning(self, settings: Settings, pinned: str | None = None) -> str:
        return self.view().version_for_planning(settings, pinned)

    def wait_for_ready(self, timeout_s: float, *, poll_s: float = 0.5, start_timeout_s: float | None = None,
                       on_wait=None, check=None, accept=None) -> FleetView:
        """Block until a ready worker is live (``accept(view)``, when given, decides which will do);
        return the view that has it.

        Gives up (:class:`NoLiveWorker`) after ``timeout_s`` with no live worker at all, or after
        ``start_timeout_s`` while workers only report ``starting``. ``check(view)`` may raise to stop
        early (a worker this command started died); ``on_wait(view, waited_s)`` reports progress.
        """
        started = time.monotonic()
        while True:
            view = self.view()
            if check is not None:
                check(view)
            if (accept(view) if accept is not None else view.live_versions()):
                return view
            waited = time.monotonic() - started
            loading = view.by_state(WorkerState.starting)
            limit = (start_timeout_s if start_timeout_s is not None else timeout_s) if loading else timeout_s
            if waited >= limit:
                what = "no worker finished loading its model" if loading else "saw no live worker"
                raise NoLiveWorker(f"{what} in {waited:.0f} s: {view.no_worker_message()}")
            if on_wait is not None:
                on_wait(view, waited)
            time.sleep(poll_s)


def _floats(raw: dict) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}
