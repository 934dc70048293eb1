"""/predict: turn Label Studio tasks into batch jobs, wait within the budget, answer in order.

Three kinds of call, told apart by the request:

* **interactive** (``params.context`` present: Auto-Annotation on): a typed prompt, or a Submit
  that asks for nothing. Policy in :mod:`egm.backend.interactive` (labels, duplicates, messages);
* **bulk** (more than ``EGM_PREDICT_BULK_TASKS`` tasks: "Retrieve predictions" on a large
  selection): handed to the bulk path, :mod:`egm.backend.bulk_predict`; answered at once, the
  workers write the predictions to Label Studio;
* **label-driven** (a task opened, a small "Retrieve predictions"): jobs, a wait within
  ``EGM_PREDICT_BUDGET_S``, late results handed to the workers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from egm.backend import interactive
from egm.backend.models import PredictRequest, PredictResponse, Prediction, Task
from egm.backend.versions import VersionSource
from egm.config.settings import Settings
from egm.contract import BatchJob, BatchResult, Priority, TaskJob
from egm.fleet import FleetError
from egm.labelstudio.config import LabelingConfig, extract_prompt, extract_selected_label, parse_labeling_config
from egm.prompts import load_templates
from egm.queries import TaskDataError, build_queries, image_of, prompt_label, task_job
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

    def config(self, req: PredictRequest) -> LabelingConfig:
        if not req.label_config:
            raise BadPredictRequest("label_config is required: connect this backend to a project with an "
                                    "Image + RectangleLabels labeling config")
        return parse_labeling_config(req.label_config)

    def plan(self, req: PredictRequest, config: LabelingConfig | None = None,
             label: str | None = None) -> PlannedJobs:
        """Jobs for the live workers' model_version (:class:`egm.fleet.FleetError` when none is live).
        ``label``: the label of a typed prompt's boxes."""
        config = config or self.config(req)
        expression = extract_prompt(req.params.context, config.prompt_from_name)
        self._check_prompt(expression)
        queries = build_queries(config.target, load_templates(self.settings), self.settings.prompt_mode, expression,
                                label=label)
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

    def _check_prompt(self, expression: str | None) -> None:
        if expression is not None and len(expression) > self.settings.max_prompt_chars:
            raise BadPredictRequest(f"prompt is {len(expression)} characters; the limit is "
                                    f"{self.settings.max_prompt_chars} (EGM_MAX_PROMPT_CHARS)")

    def predict(self, req: PredictRequest) -> PredictResponse:
        config = self.config(req)
        if req.params.context is not None:
            return self._interactive(req, config)
        if len(req.tasks) > self.settings.predict_bulk_tasks:
            from egm.backend.bulk_predict import hand_to_bulk

            return hand_to_bulk(self.settings, self.queue, self.versions, req, config)
        return PredictResponse(results=self._run(req, config))

    def _run(self, req: PredictRequest, config: LabelingConfig, label: str | None = None) -> list[Prediction | list]:
        """One entry per task: its prediction, or a :class:`_Failure` (``[]`` on the wire)."""
        started = time.time()
        deadline = started + self.settings.predict_budget_s
        plan = self.plan(req, config, label)
        if plan.jobs:
            # Before enqueueing: if this process dies while it waits, workers deliver after the deadline.
            self.queue.expect_response([j.job_id for j in plan.jobs if j.deliver_late], deadline)
            self.queue.enqueue_many(plan.jobs)
        results = self.queue.collect([j.job_id for j in plan.jobs], deadline)
        out: list[Prediction | list] = []
        for pos, slot in enumerate(plan.slots):
            if slot is None:
                log.warning("task rejected", extra={"task_id": req.tasks[pos].id, "reason": plan.rejected[pos]})
                out.append(_Failure(plan.rejected[pos]))
                continue
            job_idx, task_idx = slot
            batch = results.get(plan.jobs[job_idx].job_id)
            out.append(self._prediction(batch, task_idx) if batch is not None else _Failure(None))
        late = [j.job_id for j in plan.jobs if j.job_id not in results]
        log.info("predict answered", extra={"tasks": len(req.tasks), "jobs": len(plan.jobs), "late_jobs": len(late),
                                            "seconds": round(time.time() - started, 3)})
        return out

    # -- interactive ---------------------------------------------------------------------
    def _interactive(self, req: PredictRequest, config: LabelingConfig) -> PredictResponse:
        context = req.params.context
        expression = extract_prompt(context, config.prompt_from_name)
        if expression is None:
            # Submit with Auto-Annotation on sends {"result": []}: nothing asked, nothing new to suggest.
            log.info("interactive request without a prompt: nothing to suggest", extra={"tasks": len(req.tasks)})
            return PredictResponse(results=[[] for _ in req.tasks])
        self._check_prompt(expression)
        label = prompt_label(expression, config.target, extract_selected_label(context, config.target),
                             config.default_label or self.settings.prompt_default_label)
        version = self.versions.health().model_version
        if label is None:
            names = ", ".join(config.target.labels)
            why = (f'which label is "{expression}"? Name one of {names} in the prompt '
                   f'(or mark a default: <Label default="true">, EGM_PROMPT_DEFAULT_LABEL)')
            return PredictResponse(results=[interactive.message(config, why, version) for _ in req.tasks])
        try:
            answer = self._run(req, config, label)
        except FleetError as exc:
            return PredictResponse(results=[interactive.message(config, f"no model: {exc}", version)
                                            for _ in req.tasks])
        except redis.RedisError as exc:
            why = f"the queue (Redis) is unreachable ({type(exc).__name__}); try again shortly"
            return PredictResponse(results=[interactive.message(config, why, version) for _ in req.tasks])
        out = [self._interactive_answer(config, expression, context, task, entry, version)
               for task, entry in zip(req.tasks, answer)]
        return PredictResponse(results=out)

    def _interactive_answer(self, config: LabelingConfig, expression: str, context: dict, task: Task,
                            entry: Prediction | list, version: str | None) -> Prediction | list:
        if isinstance(entry, _Failure):
            why = entry.reason or (f"no answer within {self.settings.predict_budget_s:g} s "
                                   f"(EGM_PREDICT_BUDGET_S): the workers are busy; try again")
            return interactive.message(config, f'"{expression}": {why}', version)
        if not isinstance(entry, Prediction):
            return entry
        before = sum(item.get("type") == "rectanglelabels" for item in entry.result)
        if before == 0:
            return interactive.message(config, f'no box found for "{expression}"', entry.model_version)
        kept, dropped = interactive.drop_duplicates(entry.result, interactive.existing_boxes(context, task))
        if dropped and dropped == before:
            return interactive.message(config, f'"{expression}": the task already has this box '
                                               f"(IoU >= {interactive.DUPLICATE_IOU:g} with an existing region)",
                                       entry.model_version)
        return entry.model_copy(update={"result": kept})

    def _prediction(self, batch: BatchResult, index: int) -> Prediction | list:
        r = batch.results[index]
        if r.status != "ok":
            log.warning("task failed", extra={"task_id": r.task_id, "error": r.error, "kind": r.error_kind})
            return _Failure(r.error or "the worker failed on this task")
        # named by the worker that computed it, never by what was planned
        return Prediction(result=r.ls_result, score=r.score, model_version=batch.model_version)


class _Failure(list):
    """An empty answer (``[]`` on the wire: no prediction for this task now) that remembers why,
    so an interactive request can tell the annotator. ``reason=None``: no answer within the budget."""

    def __init__(self, reason: str | None) -> None:
        super().__init__()
        self.reason = reason
