"""/predict: turn Label Studio tasks into batch jobs, wait within the budget, answer in order."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from egm.labelstudio.config import LabelingConfig, extract_prompt, parse_labeling_config
from egm.backend.models import PredictRequest, PredictResponse, Prediction
from egm.backend.versions import VersionSource
from egm.config.settings import Settings
from egm.contract import BatchJob, BatchResult, Priority, TaskJob
from egm.prompts import load_templates
from egm.queries import TaskDataError, build_queries, image_of, task_job
from egm.queue import QueueClient

log = logging.getLogger(__name__)


class BadPredictRequest(ValueError):
    """The request cannot be served (bad config, task data or prompt): a 4xx."""


def project_id_of(project: str | int | None) -> int | None:
    """Label Studio sends ``"<id>.<created timestamp>"``."""
    if project is None or project == "":
        return None
    try:
        return int(str(project).split(".", 1)[0])
    except ValueError as exc:
        raise BadPredictRequest(f"project must look like '<id>.<timestamp>', got {str(project)[:40]!r}") from exc


@dataclass
class PlannedJobs:
    jobs: list[BatchJob]
    #: for each task position: (job index, task index in job); None when the task was rejected up front.
    slots: list[tuple[int, int] | None]
    rejected: dict[int, str]


class Predictor:
    def __init__(self, settings: Settings, queue: QueueClient, versions: VersionSource) -> None:
        self.settings = settings
        self.queue = queue
        self.versions = versions

    def plan(self, req: PredictRequest) -> PlannedJobs:
        """Jobs for the live workers' model_version (:class:`egm.fleet.FleetError` when none is live)."""
        if not req.label_config:
            raise BadPredictRequest("label_config is required: connect this backend to a project with an "
                                    "Image + RectangleLabels labeling config")
        config: LabelingConfig = parse_labeling_config(req.label_config)
        expression = extract_prompt(req.params.context, config.prompt_from_name)
        if expression is not None and len(expression) > self.settings.max_prompt_chars:
            raise BadPredictRequest(f"prompt is {len(expression)} characters; the limit is "
                                    f"{self.settings.max_prompt_chars} (EGM_MAX_PROMPT_CHARS)")
        queries = build_queries(config.target, load_templates(self.settings), self.settings.prompt_mode, expression)
        project_id = project_id_of(req.project)

        task_jobs: list[TaskJob] = []
        slots: list[tuple[int, int] | None] = []
        rejected: dict[int, str] = {}
        for pos, task in enumerate(req.tasks):
            try:
                tj = task_job(task.id, image_of(task.data, config.target.image_key), queries)
            except TaskDataError as exc:
                rejected[pos] = str(exc)
                slots.append(None)
                continue
            slots.append((len(task_jobs) // self.settings.batch_size, len(task_jobs) % self.settings.batch_size))
            task_jobs.append(tj)

        # A whole-project "retrieve predictions" must not clog the interactive queue.
        priority = Priority.interactive if len(task_jobs) <= self.settings.batch_size else Priority.bulk
        size = self.settings.batch_size
        version = self.versions.for_planning() if task_jobs else ""
        jobs = [BatchJob(priority=priority, project_id=project_id, model_version=version,
                         target=config.target, tasks=task_jobs[i:i + size], deliver_late=expression is None)
                for i in range(0, len(task_jobs), size)]
        return PlannedJobs(jobs=jobs, slots=slots, rejected=rejected)

    def predict(self, req: PredictRequest) -> PredictResponse:
        started = time.time()
        deadline = started + self.settings.predict_budget_s
        plan = self.plan(req)
        if plan.jobs:
            # Before enqueueing: if this process dies while it waits, workers deliver after the deadline.
            self.queue.expect_response([j.job_id for j in plan.jobs if j.deliver_late], deadline)
            self.queue.enqueue_many(plan.jobs)
        results = self.queue.collect([j.job_id for j in plan.jobs], deadline)
        out: list[Prediction | list] = []
        for pos, slot in enumerate(plan.slots):
            if slot is None:
                log.warning("task rejected", extra={"task_id": req.tasks[pos].id, "reason": plan.rejected[pos]})
                out.append([])
                continue
            job_idx, task_idx = slot
            batch = results.get(plan.jobs[job_idx].job_id)
            out.append(self._prediction(batch, task_idx) if batch is not None else [])
        late = [j.job_id for j in plan.jobs if j.job_id not in results]
        log.info("predict answered", extra={"tasks": len(req.tasks), "jobs": len(plan.jobs), "late_jobs": len(late),
                                            "seconds": round(time.time() - started, 3)})
        return PredictResponse(results=out)

    def _prediction(self, batch: BatchResult, index: int) -> Prediction | list:
        r = batch.results[index]
        if r.status != "ok":
            log.warning("task failed", extra={"task_id": r.task_id, "error": r.error, "kind": r.error_kind})
            return []
        # named by the worker that computed it, never by what was planned
        return Prediction(result=r.ls_result, score=r.score, model_version=batch.model_version)
