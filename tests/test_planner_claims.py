"""The planner and the write claims: a ``done`` claim is released only when Label Studio says, at
planning time, that the task has no prediction of the run's version.

The race this pins (seen as a doubled prediction under load): a job RQ already counted done sits in
a worker's outbox; the planner lists the project before the outbox writer writes the task, then the
writer writes it and sets the claim ``done``; a planner that trusted its listing would release that
claim as stale and enqueue the task again, and the task would be written twice.
"""

from __future__ import annotations

from egm.bulk.planner import Planner
from egm.bulk.run_store import RunStore
from egm.bulk.sources import SourceTask
from egm.bulk.spec import RunSpec
from egm.contract import BatchJob
from egm.queue import QueueClient
from tests.stack import TARGET

VERSION = "test-version-1"


def _spec() -> RunSpec:
    return RunSpec(run_id="claims-run", kind="label_studio", model_version=VERSION, target=TARGET, queries=[],
                   batch_size=8, project_id=1, label_studio_url="http://ls.invalid")


def _tasks() -> list[SourceTask]:
    # the listing saw no prediction for any of them
    return [SourceTask(task_id=i, ref=None, image=f"http://img.invalid/{i}.jpg") for i in (1, 2, 3)]


def _claims(queue: QueueClient) -> dict[int, bytes | None]:
    return {i: queue.redis.get(queue.keys.written(VERSION, i)) for i in (1, 2, 3)}


def test_a_claim_written_after_the_listing_is_kept_and_its_task_skipped(egm_env):
    queue = QueueClient(egm_env)
    RunStore(queue.redis, queue.prefix).create("claims-run", total=0, model_version=VERSION, source="test")
    # task 2 was written by an outbox writer after the listing; task 3's prediction was deleted
    for i in (2, 3):
        queue.redis.set(queue.keys.written(VERSION, i), "done")
    asked: list[int] = []

    def has_prediction(task_id: int) -> bool:
        asked.append(task_id)
        return task_id == 2

    report = Planner(queue, _spec(), has_prediction=has_prediction).plan(_tasks())

    assert sorted(asked) == [2, 3], "only tasks with a done claim are looked up"
    planned = {t.task_id for job_id in report.enqueued_jobs
               for t in BatchJob.model_validate(queue.fetch_job(job_id).args[0]).tasks}
    assert planned == {1, 3}, "the task written since the listing is not enqueued again"
    assert report.skipped == 1 and report.enqueued_tasks == 2
    claims = _claims(queue)
    assert claims[2] == b"done", "the live claim stays: a second write would double the prediction"
    assert claims[3] is None, "the stale claim of a deleted prediction is released"
    statuses = RunStore(queue.redis, queue.prefix).statuses("claims-run")
    assert statuses["2"] == "skipped"


def test_without_a_label_studio_check_every_done_claim_counts_as_stale(egm_env):
    queue = QueueClient(egm_env)
    RunStore(queue.redis, queue.prefix).create("claims-run", total=0, model_version=VERSION, source="test")
    queue.redis.set(queue.keys.written(VERSION, 1), "done")

    report = Planner(queue, _spec()).plan(_tasks())

    assert report.enqueued_tasks == 3
    assert _claims(queue)[1] is None
