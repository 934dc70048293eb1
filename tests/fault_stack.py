"""Helpers for the fault, load and abuse tests: real processes, real Redis, real Label Studio.

* :class:`Procs`: backend and worker subprocesses (``egm-assist serve`` / ``worker``) with one
  environment, each logging to its own file, stopped together;
* :func:`ls_project`: a Label Studio project whose tasks point at local sample images;
* :func:`bulk_jobs`: the batch jobs ``egm-assist prelabel`` enqueues for such tasks (write to
  Label Studio, with a run id), built directly so these tests do not depend on the planner;
* :func:`outcome`: per task, how many predictions Label Studio holds and whether the run lists it
  as failed: the "exactly once or failed with a reason" check.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import httpx

from egm import processes
from egm.contract import BatchJob, Priority, Query, TaskJob
from egm.bulk.run_store import RunStore
from tests.stack import BOXES_CONFIG, SAMPLES, TARGET, sample_images

T = TypeVar("T")

PROMPT = ('Locate every instance that belongs to the following categories: "circle, square". '
          'Report bbox coordinates in JSON format.')


def scripted_version() -> str:
    """The model_version of the scripted workers these tests start (default settings but for the engine)."""
    from egm.config.settings import Settings
    from egm.worker.engines import create_engine
    from egm.worker.identity import identify

    settings = Settings(EGM_ENGINE="scripted")
    return identify(create_engine(settings), settings).model_version


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - a service in the middle of a restart
            last = None
            error = exc
        else:
            error = None
            if last:
                return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r}"
                         f"{', error: ' + repr(error) if error else ''})")


# --------------------------------------------------------------------------- processes


@dataclass
class Procs:
    """Backend and worker processes sharing one environment; logs in ``log_dir``."""

    env: dict[str, str]
    log_dir: Path
    procs: dict[str, object] = field(default_factory=dict)
    backend_port: int = 0

    @classmethod
    def create(cls, redis_url: str, prefix: str, log_dir: Path, label_studio=None, ls_url: str | None = None,
               **extra: str) -> "Procs":
        env = {"REDIS_URL": redis_url, "EGM_QUEUE_PREFIX": prefix, "EGM_ENGINE": "scripted",
               "EGM_HEARTBEAT_S": "1", "EGM_LOCAL_FILES_ROOT": str(SAMPLES), "EGM_LOG_FORMAT": "json",
               "EGM_CACHE_TTL_S": "0", "EGM_TASK_RETRIES": "0"}
        if label_studio is not None:
            env.update({"LABEL_STUDIO_URL": ls_url or label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token})
        env.update(extra)
        return cls(env=env, log_dir=log_dir)

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def worker(self, name: str, **extra: str):
        proc = processes.spawn(["worker", "--name", name], {**self.env, **extra}, self.log_dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def backend(self, name: str = "backend", port: int | None = None, **extra: str):
        self.backend_port = port or self.backend_port or processes.free_port()
        proc = processes.spawn(["serve"], {**self.env, "EGM_PORT": str(self.backend_port), **extra},
                               self.log_dir / f"{name}.log")
        self.procs[name] = proc
        processes.wait_http(self.backend_url + "/health", 60, proc)
        return proc

    def wait_ready(self, n: int = 1, timeout_s: float = 60) -> str:
        """Until ``n`` workers are ready (fleet registry); the version they serve."""
        import redis

        from egm.fleet import Fleet

        fleet = Fleet(redis.Redis.from_url(self.env["REDIS_URL"]), self.env["EGM_QUEUE_PREFIX"])
        return fleet.wait_for_ready(timeout_s, poll_s=0.1, accept=lambda v: len(v.ready) >= n).current_version()

    def kill(self, name: str, sig: int = 9) -> None:
        processes.stop(self.procs.pop(name), sig=sig)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop_all(self) -> None:
        for name in list(self.procs):
            processes.stop(self.procs.pop(name))

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def model_version(self) -> str:
        """What the backend reports: the live workers' version."""
        return httpx.get(self.backend_url + "/health", timeout=10).json()["model_version"]

    def predict(self, body: dict, timeout_s: float = 60, **kw) -> httpx.Response:
        return httpx.post(self.backend_url + "/predict", json=body, timeout=timeout_s, **kw)


# --------------------------------------------------------------------------- Label Studio data


def ls_project(label_studio, n_tasks: int, config: str = BOXES_CONFIG) -> tuple[int, dict[int, str]]:
    """A project with ``n_tasks`` tasks whose ``image`` is a local sample path: (project id, {task id: image})."""
    project = label_studio.create_project(config)
    images = [str(p) for p in sample_images()]
    data = [{"image": images[i % len(images)], "n": i} for i in range(n_tasks)]
    ids = label_studio.import_tasks(project, data)
    assert len(ids) == n_tasks
    return project, {tid: d["image"] for tid, d in zip(ids, data)}


def predict_body(project_id: int, tasks: dict[int, str], config: str = BOXES_CONFIG) -> dict:
    """A /predict request as Label Studio sends it."""
    return {"tasks": [{"id": t, "data": {"image": img}} for t, img in tasks.items()],
            "project": f"{project_id}.1700000000", "label_config": config, "params": {"context": None}}


def bulk_jobs(project_id: int | None, tasks: dict[int, str], run_id: str | None, size: int = 4,
              model_version: str | None = None, write: bool = True) -> list[BatchJob]:
    items = list(tasks.items())
    model_version = model_version or scripted_version()
    return [BatchJob(priority=Priority.bulk, project_id=project_id, model_version=model_version, target=TARGET,
                     tasks=[TaskJob(task_id=t, image=img, queries=[Query(text=PROMPT)]) for t, img in chunk],
                     write_to_label_studio=write, run_id=run_id)
            for chunk in (items[i:i + size] for i in range(0, len(items), size))]


def start_run(queue, run_id: str, jobs: list[BatchJob]) -> None:
    total = sum(len(j.tasks) for j in jobs)
    store = RunStore(queue.redis, queue.prefix)
    store.create(run_id, total=total, model_version=jobs[0].model_version, source="fault test")
    store.add_enqueued(run_id, total)
    queue.enqueue_many(jobs)


# --------------------------------------------------------------------------- checks


def prediction_counts(label_studio, project_id: int, model_version: str | None = None) -> Counter:
    preds = label_studio.list_predictions(project_id)
    model_version = model_version or scripted_version()
    return Counter(p["task"] for p in preds if p.get("model_version") == model_version)


@dataclass
class Outcome:
    counts: Counter
    failed: dict[int, str]  # task id -> reason
    missing: list[int]  # neither predicted nor listed as failed
    duplicated: list[int]  # more than one prediction of this model version

    @property
    def settled(self) -> bool:
        return not self.missing


def outcome(label_studio, project_id: int, task_ids, queue=None, run_id: str | None = None,
            model_version: str | None = None) -> Outcome:
    counts = prediction_counts(label_studio, project_id, model_version)
    failed: dict[int, str] = {}
    if queue is not None and run_id:
        for item in RunStore(queue.redis, queue.prefix).failed(run_id):
            if item.get("task_id") is not None:
                failed[int(item["task_id"])] = item.get("error") or ""
    missing = [t for t in task_ids if counts[t] == 0 and t not in failed]
    duplicated = [t for t, n in counts.items() if n > 1]
    return Outcome(counts, failed, missing, duplicated)


def queues_drained(queue) -> bool:
    """Nothing queued or running, nothing in RQ's failed registries."""
    depths = queue.depths()
    return all(d["queued"] == 0 and d["started"] == 0 and d["failed"] == 0 for d in depths.values())
