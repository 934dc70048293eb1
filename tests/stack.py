"""Helpers that build the real pieces (jobs, workers, backend) for integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from egm.config.settings import Settings
from egm.contract import BatchJob, LabelTarget, Priority, Query, TaskJob
from egm import processes

SAMPLES = Path(__file__).resolve().parent.parent / "egm" / "samples"
TARGET = LabelTarget(from_name="label", to_name="image", labels=["circle", "square"],
                     aliases={"circle": "circle", "square": "square"}, reasoning_from_name="reasoning")
BOXES_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="circle" background="#e6194b"/><Label value="square" background="#4363d8"/>
  </RectangleLabels>
  <TextArea name="reasoning" toName="image" perRegion="true"/>
</View>"""


def sample_images() -> list[Path]:
    return sorted(SAMPLES.glob("*.jpg"))


def version_of(engine=None, settings: Settings | None = None) -> str:
    """The model_version a worker running ``engine`` (default: a plain scripted engine) with ``settings``
    (default: the current ones) serves: what jobs for it must be planned with."""
    from egm.config.settings import get_settings
    from egm.worker.engines.scripted import ScriptedEngine
    from egm.worker.identity import identify

    return identify(engine or ScriptedEngine(), settings or get_settings()).model_version


def batch_job(images: list[Path], priority: Priority = Priority.bulk, **kw) -> BatchJob:
    """A job for the default scripted worker (``model_version=`` plans it for another)."""
    tasks = [TaskJob(task_id=i + 1, image=str(p), queries=[Query(text='Locate every instance that belongs to '
                                                               'the following categories: "circle, square". '
                                                               'Report bbox coordinates in JSON format.')])
             for i, p in enumerate(images)]
    version = kw.pop("model_version", None) or version_of()
    return BatchJob(priority=priority, model_version=version, target=TARGET, tasks=tasks, **kw)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {"REDIS_URL": settings.redis_url, "EGM_QUEUE_PREFIX": settings.queue_prefix,
           "EGM_LOCAL_FILES_ROOT": str(SAMPLES), "EGM_ENGINE": "scripted", "EGM_HEARTBEAT_S": "1",
           "EGM_LOG_FORMAT": "json"}
    env.update(extra)
    return env


def spawn_worker(settings: Settings, log_path: Path, *args: str, **extra: str):
    return processes.spawn(["worker", *args], worker_env(settings, **extra), log_path)


@contextmanager
def running_worker(settings: Settings, log_path: Path, *args: str, **extra: str) -> Iterator:
    """A worker process, ready (published in the fleet) on entry and stopped on exit."""
    proc = spawn_worker(settings, log_path, *args, **extra)
    try:
        wait_ready(settings, 60, proc)
        yield proc
    finally:
        processes.stop(proc)


def wait_ready(settings: Settings, timeout_s: float = 60, proc=None) -> str:
    """Block until a worker of this Redis and prefix is ready (fleet registry); its model_version.
    ``proc``: a worker process whose death ends the wait at once."""
    from egm.fleet import Fleet, FleetError
    from egm.queue import connect

    def check(view):
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"the worker exited with code {proc.returncode}: {view.no_worker_message()}")

    fleet = Fleet.from_settings(settings, connect(settings))
    return fleet.wait_for_ready(timeout_s, poll_s=0.1, check=check).current_version()

