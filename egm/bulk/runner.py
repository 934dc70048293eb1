"""One ``prelabel`` invocation: build the run, plan it, follow it to the end, write the outputs.

``BulkRun.start`` creates (or resumes) the run and enqueues what is left;
``BulkRun.follow`` shows progress until every task is resolved, meanwhile promoting
due retries, re-queueing batches of dead workers, failing batches RQ gave up on,
collecting local results and re-planning if work went missing; ``BulkRun.finish``
writes the local outputs and marks the run done. Interrupting ``follow`` loses
nothing: the workers keep going, and the same command resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import redis

from egm.config.settings import Settings
from egm.bulk.completion import finish_if_done
from egm.bulk.rq_jobs import alive_jobs, fail_abandoned
from egm.bulk.outputs import COCO_FILE, LS_IMPORT_FILE, ResultLog, write_coco, write_label_studio_import
from egm.bulk.planner import PlanReport, Planner
from egm.bulk.progress import ProgressPrinter
from egm.bulk.retries import RetryScheduler
from egm.bulk.sources import SourceTask, folder_tasks, label_studio_tasks, manifest_tasks
from egm.bulk.spec import RunSpec, label_studio_run_id, local_run_id
from egm.contract import LabelTarget
from egm.prompts import load_templates
from egm.queries import build_queries
from egm.queue import QueueClient
from egm.bulk.run_store import RunProgress, RunState, RunStore, TaskStatus, task_key

log = logging.getLogger(__name__)

MAINTENANCE_EVERY_S = 5.0
#: how long ``follow`` waits out an unreachable Redis (a restart) before giving up.
REDIS_OUTAGE_S = 120.0
STALL_REPLAN_S = 30.0


# --------------------------------------------------------------------------- specs


def label_studio_spec(settings: Settings, client, project_id: int, model_version: str, *,
                      view_id: int | None = None, filters: dict | None = None) -> RunSpec:
    from egm.labelstudio.config import parse_labeling_config

    project = client.get_project(project_id)
    config = parse_labeling_config(project.label_config)
    target = config.target
    queries = build_queries(target, load_templates(settings), settings.prompt_mode)
    run_id = label_studio_run_id(client.url, project_id, view_id, filters, model_version)
    return RunSpec(run_id=run_id, kind="label_studio", model_version=model_version, target=target,
                   queries=queries, batch_size=settings.bulk_batch_size, project_id=project_id, view_id=view_id,
                   filters=filters, label_studio_url=client.url)


def local_target(labels: list[str], label_config: str | None = None) -> LabelTarget:
    """Where boxes go in the import file: from a labeling config, else the names of config/labeling/*.xml."""
    if label_config:
        from egm.labelstudio.config import parse_labeling_config

        config = parse_labeling_config(label_config)
        return config.target
    if not labels:
        raise ValueError("give the labels to find (--labels cat,dog) or a labeling config (--label-config)")
    return LabelTarget(from_name="label", to_name="image", labels=labels,
                       aliases={label.lower(): label for label in labels}, reasoning_from_name="reasoning")


def local_spec(settings: Settings, *, source: Path, source_kind: str, files_root: Path, out_dir: Path,
               target: LabelTarget, model_version: str, image_url_prefix: str = "") -> RunSpec:
    queries = build_queries(target, load_templates(settings), settings.prompt_mode)
    source_path = str(source.resolve())
    return RunSpec(run_id=local_run_id(source_path, target.labels, model_version), kind="local",
                   model_version=model_version, target=target, queries=queries, batch_size=settings.bulk_batch_size,
                   source_path=source_path, source_kind=source_kind, files_root=str(files_root.resolve()),
                   out_dir=str(out_dir.resolve()), image_url_prefix=image_url_prefix)


def source_tasks(spec: RunSpec, client=None) -> Iterable[SourceTask]:
    if spec.kind == "label_studio":
        if client is None:
            raise ValueError("a Label Studio run needs a Label Studio client (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
        return label_studio_tasks(client, spec.project_id, spec.target.image_key, spec.model_version,
                                  view_id=spec.view_id, filters=spec.filters)
    root = Path(spec.files_root or spec.source_path)
    if spec.source_kind == "folder":
        return folder_tasks(Path(spec.source_path), root)
    return manifest_tasks(Path(spec.source_path), root)


# --------------------------------------------------------------------------- the run


@dataclass
class RunOutcome:
    progress: RunProgress
    failed: list[dict]
    outputs: dict[str, str] = field(default_factory=dict)
    complete: bool = False


class LocalCollector:
    """Moves finished batches' results from Redis into the run's results log (local runs)."""

    def __init__(self, queue: QueueClient, runs: RunStore, run_id: str, out_dir: Path) -> None:
        self.queue = queue
        self.runs = runs
        self.run_id = run_id
        self.log = ResultLog(out_dir)
        self.done = set(self.log.read())
        self.offset = 0

    def collect(self) -> int:
        """Results of the batches finished since the last call."""
        job_ids = self.runs.finished_jobs(self.run_id, self.offset)
        self.offset += len(job_ids)
        return self.collect_jobs(job_ids)

    def collect_jobs(self, job_ids: list[str]) -> int:
        added = 0
        # expired results are skipped: their tasks get re-planned, and the cache answers them
        for result in self.queue.results(list(dict.fromkeys(job_ids))):
            fresh = [r for r in result.results if r.status == "ok" and self._key(r) not in self.done]
            added += self.log.append(fresh)
            self.done.update(self._key(r) for r in fresh)
        return added

    @staticmethod
    def _key(result) -> str:
        return task_key(result.task_id, result.ref)


class BulkRun:
    def __init__(self, settings: Settings, spec: RunSpec, *, client=None, queue: QueueClient | None = None,
                 printer: ProgressPrinter | None = None, poll_s: float = 0.5,
                 tasks_factory: Callable[[], Iterable[SourceTask]] | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.client = client
        self.queue = queue or QueueClient(settings)
        self.runs = RunStore(self.queue.redis, self.queue.prefix)
        self.retries = RetryScheduler(self.queue, settings)
        self.printer = printer or ProgressPrinter(enabled=False)
        self.poll_s = poll_s
        self.tasks_factory = tasks_factory or (lambda: source_tasks(spec, client))
        self.collector = (LocalCollector(self.queue, self.runs, spec.run_id, Path(spec.out_dir))
                          if spec.kind == "local" else None)
        self.plan_report: PlanReport | None = None

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    # -- start -----------------------------------------------------------------------
    def start(self, retry_failed: bool = False, set_project_version: bool = True) -> PlanReport:
        """Create or resume the run and enqueue what is left. ``set_project_version``: whoever completes
        the run (the worker of its last batch, or ``finish``) makes the project show its version."""
        self.runs.create(self.run_id, total=0, model_version=self.spec.model_version, source=self.spec.source,
                         spec=self.spec.model_dump(mode="json"), switch_project_version=set_project_version)
        if retry_failed:
            failed = self.runs.failed(self.run_id)
            self.retries.reset_attempts(self.run_id, [task_key(f.get("task_id"), f.get("ref")) for f in failed])
        report = self._plan(retry_failed)
        if self.collector is None:  # nothing left to enqueue (all predicted already): done now
            finish_if_done(self.runs, self.run_id, self.client)
        return report

    def _plan(self, retry_failed: bool = False) -> PlanReport:
        if self.collector is not None:
            self.collector.collect()
        done = self.collector.done if self.collector is not None else frozenset()
        planner = Planner(self.queue, self.spec, on_flush=self._show_planning,
                          has_prediction=self._has_prediction if self.client is not None else None)
        self.plan_report = planner.plan(self.tasks_factory(), done_keys=done, retry_failed=retry_failed)
        return self.plan_report

    def _has_prediction(self, task_id: int) -> bool:
        """Whether the task has a prediction of this run's version in Label Studio right now."""
        return any(p.model_version == self.spec.model_version for p in self.client.list_predictions(task_id=task_id))

    def _show_planning(self, report: PlanReport) -> None:
        progress = self.runs.progress(self.run_id)
        if progress is not None:
            self.printer.update(progress)

    # -- follow ---------------------------------------------------------------------
    def follow(self, timeout_s: float | None = None, watch: Callable[[], None] | None = None) -> RunProgress:
        """Show progress until every task is resolved (or the run is cancelled, or the timeout).
        ``watch()`` runs with the maintenance rounds and may raise to stop following (workers gone).
        Redis going away for a while (a restart: the run's state is in its append-only file) is
        waited out for up to ``REDIS_OUTAGE_S``; longer, and the error ends the command."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        state = {"maintenance": 0.0, "resolved": -1, "change": time.monotonic(), "replan": 0.0}
        outage_since: float | None = None
        while True:
            try:
                progress = self._follow_round(state, watch)
                if outage_since is not None:
                    self.printer.message("Redis is back; following the run again")
                    outage_since = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                if outage_since is None:
                    outage_since = now
                    self.printer.message(f"Redis unreachable ({type(exc).__name__}); waiting up to "
                                         f"{REDIS_OUTAGE_S:.0f} s for it to come back")
                if now - outage_since > REDIS_OUTAGE_S:
                    raise
                time.sleep(1.0)
                continue
            if progress is not None:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} not finished after {timeout_s:g} s")
            time.sleep(self.poll_s)

    def _follow_round(self, state: dict, watch: Callable[[], None] | None) -> RunProgress | None:
        """One look at the run; its progress when following ends (done or cancelled), else None."""
        progress = self._progress()
        self.printer.update(progress)
        if progress.state == RunState.cancelled:
            return progress
        if self.collector is not None and self.collector.collect():
            progress = self._progress()
        self.retries.promote_due()
        now = time.monotonic()
        if now - state["maintenance"] >= MAINTENANCE_EVERY_S:
            self._maintain()
            if watch is not None:
                watch()
            state["maintenance"] = now
            progress = self._progress()
        if self._complete(progress):
            return progress
        if progress.resolved != state["resolved"]:
            state["resolved"], state["change"] = progress.resolved, now
        elif now - state["change"] >= STALL_REPLAN_S and now - state["replan"] >= STALL_REPLAN_S:
            state["replan"] = now
            self._replan_if_lost()
        return None

    def _progress(self) -> RunProgress:
        return self.runs.progress(self.run_id) or RunProgress(run_id=self.run_id)

    def _complete(self, progress: RunProgress) -> bool:
        if progress.remaining or progress.retrying:
            return False
        if self.collector is None:
            return True
        missing = self._uncollected()
        if not missing:
            return True
        # Results that expired before we collected them: plan those tasks again (the cache answers them).
        log.info("re-planning tasks whose results expired", extra={"run_id": self.run_id, "count": len(missing)})
        self.runs.mark(self.run_id, {k: TaskStatus.queued for k in missing})
        self._plan()
        return False

    def _uncollected(self) -> set[str]:
        """Tasks a worker finished whose results are not in the local log yet and cannot be fetched."""
        self.collector.collect()
        ok = {k for k, s in self.runs.statuses(self.run_id).items() if s.succeeded}
        if self.plan_report is not None:
            ok &= set(self.plan_report.images)
        missing = ok - self.collector.done
        if missing:  # a worker between its two writes (status, then finished log): fetch by assignment
            assign = self.runs.assignments(self.run_id)
            self.collector.collect_jobs(sorted({assign[k] for k in missing if k in assign}))
            missing = ok - self.collector.done
        return missing

    def _maintain(self) -> None:
        self.queue.recover_abandoned()
        if fail_abandoned(self.queue, self.runs, self.run_id, self.spec.model_version):
            self.printer.message("some batch jobs failed for good; their tasks are in the failed list")

    def _replan_if_lost(self) -> None:
        """No progress for a while and nothing alive: batches went missing (Redis flush, manual
        deletion); plan the run again, which enqueues exactly the tasks nobody is working on."""
        assign = self.runs.assignments(self.run_id)
        if alive_jobs(self.queue, sorted(set(assign.values()))) or self.retries.pending(self.run_id):
            return
        log.warning("run stalled with no live batch; re-planning", extra={"run_id": self.run_id})
        self._plan()

    # -- finish ----------------------------------------------------------------------
    def finish(self, progress: RunProgress, *, set_project_version: bool = True) -> RunOutcome:
        outcome = RunOutcome(progress=progress, failed=self.runs.failed(self.run_id),
                             complete=progress.remaining == 0 and progress.retrying == 0)
        if progress.state == RunState.cancelled:
            return outcome
        if outcome.complete:
            self.runs.set_state(self.run_id, RunState.done)  # a worker may have done it already
            outcome.progress = self._progress()
        if self.collector is not None:
            outcome.outputs = self._write_outputs()
        elif set_project_version and self.client is not None and progress.done + progress.skipped > 0:
            self._show_in_label_studio()
        return outcome

    def _write_outputs(self) -> dict[str, str]:
        self.collector.collect()
        out_dir = Path(self.spec.out_dir)
        images = self.plan_report.images if self.plan_report else {}
        by_key = self.collector.log.read()
        keys = list(images) if images else list(by_key)
        results = [by_key[k] for k in keys if k in by_key]
        write_label_studio_import(out_dir / LS_IMPORT_FILE, results, images, self.spec.target,
                                  self.spec.model_version, self.spec.image_url_prefix)
        write_coco(out_dir / COCO_FILE, results, images, self.spec.target.labels)
        return {"label_studio_import": str(out_dir / LS_IMPORT_FILE), "coco": str(out_dir / COCO_FILE)}

    def _show_in_label_studio(self) -> None:
        """Make the project show this version's predictions (and score them in the Data Manager)."""
        from egm.labelstudio import VersionShown

        try:
            # also renames the connected ML backend: the project keeps asking it for new tasks' predictions
            password = self.settings.basic_auth_pass.get_secret_value() if self.settings.basic_auth_pass else None
            shown = self.client.show_model_version(self.spec.project_id, self.spec.model_version,
                                                   basic_auth_pass=password)
            if shown is VersionShown.changed:
                self.printer.message(f"project {self.spec.project_id} now shows predictions of model version "
                                     f"{self.spec.model_version}")
        except Exception as exc:  # noqa: BLE001 - the predictions are written; this is a convenience
            self.printer.message(f"note: could not set the project's model version: {exc}")
