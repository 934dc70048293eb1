"""Helpers that build the real pieces (jobs, workers, backend) for integration tests."""

from __future__ import annotations

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
    <Label value="circle"/><Label value="square"/>
  </RectangleLabels>
  <TextArea name="reasoning" toName="image" perRegion="true"/>
</View>"""


def sample_images() -> list[Path]:
    return sorted(SAMPLES.glob("*.jpg"))


def batch_job(images: list[Path], priority: Priority = Priority.bulk, **kw) -> BatchJob:
    tasks = [TaskJob(task_id=i + 1, image=str(p), queries=[Query(text='Locate every instance that belongs to '
                                                               'the following categories: "circle, square". '
                                                               'Report bbox coordinates in JSON format.')])
             for i, p in enumerate(images)]
    return BatchJob(priority=priority, model_version=kw.pop("model_version", "test-v1"), target=TARGET,
                    tasks=tasks, **kw)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {"REDIS_URL": settings.redis_url, "EGM_QUEUE_PREFIX": settings.queue_prefix,
           "EGM_LOCAL_FILES_ROOT": str(SAMPLES), "EGM_ENGINE": "scripted", "EGM_HEARTBEAT_S": "1",
           "EGM_LOG_FORMAT": "json"}
    env.update(extra)
    return env


def spawn_worker(settings: Settings, log_path: Path, *args: str, **extra: str):
    return processes.spawn(["worker", *args], worker_env(settings, **extra), log_path)

