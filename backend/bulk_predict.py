"""A /predict too large for one round trip ("Retrieve predictions" on a big selection) goes the bulk way.

Label Studio 1.23's "Retrieve predictions" action sends every selected task in one ``/predict``
and waits up to ``ML_TIMEOUT_PREDICT`` (100 s) for one entry per task; it creates a prediction
for each entry that has a ``result`` and nothing for an entry that is ``[]``. Above
``EGM_PREDICT_BULK_TASKS`` tasks the backend therefore plans a bulk run from the request's tasks
with the machinery of ``egm-assist prelabel`` (:class:`egm.bulk.runner.BulkRun`: batch jobs on the
bulk queue whose workers write the predictions to Label Studio, exactly once per task and
``model_version``), answers ``[]`` for every task at once, and follows the run in a background
thread (retries, batches of dead workers, the project's version at the end). The predictions
the workers write are what count; Label Studio skips tasks that have one of the live version
the next time.

The run id is derived from the project, the selected task ids and the version, so the same
selection sent twice lands on the same run and enqueues nothing twice. If the backend stops
before the run ends, ``egm-assist prelabel --project ID`` finishes the project (write claims
keep every task at one prediction per version).
"""

from __future__ import annotations

import hashlib
import logging
import threading

from egm.backend.models import PredictRequest, PredictResponse, Task
from egm.backend.predictor import BadPredictRequest, project_id_of
from egm.backend.versions import VersionSource
from egm.bulk.planner import PlannerBusy
from egm.bulk.runner import BulkRun
from egm.bulk.sources import SourceTask
from egm.bulk.spec import RunSpec, label_studio_run_id
from egm.config.settings import Settings
from egm.labelstudio.config import LabelingConfig
from egm.prompts import load_templates
from egm.queries import TaskDataError, build_queries, image_of
from egm.queue import QueueClient

log = logging.getLogger(__name__)
#: how long the background thread follows one run before leaving it to `egm-assist prelabel`.
FOLLOW_S = 24 * 3600.0


def hand_to_bulk(settings: Settings, queue: QueueClient, versions: VersionSource, req: PredictRequest,
                 config: LabelingConfig) -> PredictResponse:
    project_id = project_id_of(req.project)
    if project_id is None:
        raise BadPredictRequest(f"a /predict of {len(req.tasks)} tasks (over EGM_PREDICT_BULK_TASKS) is run in bulk "
                                "and needs the Label Studio project ('project' is missing)")
    version = versions.for_planning()
    target = config.target
    tasks = [_source_task(t, target.image_key) for t in req.tasks]
    spec = RunSpec(run_id=_run_id(settings, project_id, tasks, version), kind="label_studio", model_version=version,
                   target=target, queries=build_queries(target, load_templates(settings), settings.prompt_mode),
                   batch_size=settings.bulk_batch_size, project_id=project_id,
                   label_studio_url=settings.label_studio_url)
    run = BulkRun(settings, spec, client=_client(settings), queue=queue, tasks_factory=lambda: tasks)
    try:
        report = run.start()
    except PlannerBusy:
        log.info("this selection is being planned already", extra={"run_id": spec.run_id})
    else:
        log.info("predict handed to the bulk path",
                 extra={"run_id": spec.run_id, "tasks": len(tasks), "enqueued": report.enqueued_tasks,
                        "in_flight": report.in_flight, "rejected": report.rejected, "model_version": version})
        threading.Thread(target=_follow, args=(run,), daemon=True, name=f"egm-bulk-{spec.run_id}").start()
    return PredictResponse(results=[[] for _ in req.tasks])


def _source_task(task: Task, image_key: str) -> SourceTask:
    if task.id is None:
        return SourceTask(task_id=None, ref="(no id)", image="", problem="task has no id")
    try:
        return SourceTask(task_id=task.id, ref=None, image=image_of(task.data, image_key))
    except TaskDataError as exc:
        return SourceTask(task_id=task.id, ref=None, image="", problem=str(exc))


def _run_id(settings: Settings, project_id: int, tasks: list[SourceTask], version: str) -> str:
    ids = ",".join(str(i) for i in sorted(t.task_id for t in tasks if t.task_id is not None))
    selection = hashlib.sha256(ids.encode()).hexdigest()[:16]
    return label_studio_run_id(settings.label_studio_url, project_id, None, {"predict_selection": selection}, version)


def _client(settings: Settings):
    if settings.label_studio_api_key is None:
        return None
    from egm.labelstudio import LabelStudioClient

    return LabelStudioClient.from_settings(settings)


def _follow(run: BulkRun) -> None:
    try:
        progress = run.follow(timeout_s=FOLLOW_S)
        outcome = run.finish(progress)
        log.info("bulk predict run finished", extra={"run_id": run.run_id, "done": progress.done,
                                                      "failed": len(outcome.failed), "complete": outcome.complete})
    except Exception:  # noqa: BLE001 - a background thread: log, the run stays resumable
        log.exception("following a bulk predict run failed; `egm-assist prelabel` can finish it",
                      extra={"run_id": run.run_id})
