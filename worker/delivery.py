"""Write finished predictions to Label Studio: the worker's write policy and its claims.

**Policy** (:class:`Delivery`): while Label Studio is unreachable (no answer, 5xx, 429) the
worker waits with backoff, up to ``EGM_LS_OUTAGE_WAIT_S``, rather than failing the job: the
results are computed and a retried job would recompute them. After that the unwritten tasks
fail as ``ErrorKind.ls_unavailable`` (bulk runs retry them later); on a refusal (4xx) as
``ErrorKind.ls_refused``; always with the reason, so they are listed, never lost. Interactive
results are written by the worker only past the requester's deadline (the hand-off in
:mod:`egm.queue`): at once when it is already past, else filed for the ``late`` sweep
(:meth:`Delivery.deliver_due`, run between jobs).

**Claims** (:class:`LabelStudioWriter`), exactly once per (task, model_version).
A Redis claim ``written:<model_version>:<task>`` is taken before writing. A claim
left ``pending`` by a worker that died mid-write is verified against Label
Studio (does the task already have a prediction of this version?) before anyone
writes again, so retries and crashes never create duplicates.

Claims are ``pending:<time>:<owner>`` (owner: the batch job id). A fresh claim of
another owner means someone is writing right now; a claim of the same owner was
left by an earlier attempt of this very job (its worker died, or the write
failed), so it is verified at once. A write that raised leaves its claims
``pending:0:<owner>``: Label Studio may have stored the predictions before the
connection broke, so the next attempt checks before writing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from egm.backoff import backoff_s
from egm.contract import BatchJob, BatchResult, ErrorKind, TaskResult
from egm.keys import Keys
from egm.labelstudio import LabelStudioError
from egm.queue import QueueClient

log = logging.getLogger(__name__)

PENDING_STALE_S = 60
DONE_TTL_S = 90 * 24 * 3600
#: waits between tries of a write while Label Studio is unreachable: 1, 2, 4 ... 15 s.
WAIT_BASE_S, WAIT_MAX_S = 1.0, 15.0


@dataclass
class WriteReport:
    written: list[int] = field(default_factory=list)
    already: list[int] = field(default_factory=list)
    #: task id -> why Label Studio refused that prediction (e.g. the task was deleted).
    refused: dict[int, str] = field(default_factory=dict)


class LabelStudioWriter:
    def __init__(self, client, connection: redis.Redis, prefix: str) -> None:
        self.client = client
        self.redis = connection
        self.prefix = prefix

    def _claim_key(self, model_version: str, task_id: int) -> str:
        return Keys(self.prefix).written(model_version, task_id)

    def is_written(self, model_version: str, task_id: int) -> bool:
        return self.redis.get(self._claim_key(model_version, task_id)) == b"done"

    def write(self, project_id: int | None, results: list[TaskResult], model_version: str,
              owner: str | None = None) -> WriteReport:
        """Write the ok results not yet written; ``owner`` (the batch job id) names this writer's claims."""
        report = WriteReport()
        todo = [r for r in results if r.status == "ok" and r.task_id is not None]
        if not todo:
            return report
        if self.client is None:
            raise RuntimeError("cannot write predictions: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set")
        mine = [r for r in todo if self._claim(model_version, r.task_id, report, owner or "")]
        if not mine:
            return report
        items = [{"task": r.task_id, "result": r.ls_result, "score": r.score, "model_version": model_version}
                 for r in mine]
        try:
            if project_id is not None:
                outcome = self.client.create_predictions(project_id, items)
                report.refused = {items[f.index]["task"]: f.error for f in outcome.failed}
            else:
                for item in items:
                    self.client.create_prediction(item["task"], item["result"], item["score"], model_version)
        except Exception:
            # Unknown outcome (Label Studio may have stored them before the connection broke):
            # leave the claims stale so the next attempt verifies in Label Studio before writing.
            with self.redis.pipeline(transaction=False) as pipe:
                for r in mine:
                    pipe.set(self._claim_key(model_version, r.task_id), f"pending:0:{owner or ''}", ex=DONE_TTL_S)
                pipe.execute()
            raise
        with self.redis.pipeline(transaction=False) as pipe:
            for r in mine:
                key = self._claim_key(model_version, r.task_id)
                if r.task_id in report.refused:
                    pipe.delete(key)
                else:
                    pipe.set(key, "done", ex=DONE_TTL_S)
                    report.written.append(r.task_id)
            pipe.execute()
        log.info("wrote predictions to Label Studio",
                 extra={"project": project_id, "count": len(report.written), "refused": len(report.refused),
                        "model_version": model_version})
        return report

    def _claim(self, model_version: str, task_id: int, report: WriteReport, owner: str) -> bool:
        key = self._claim_key(model_version, task_id)
        if self.redis.set(key, f"pending:{time.time()}:{owner}", nx=True, ex=DONE_TTL_S):
            return True
        value = (self.redis.get(key) or b"").decode()
        if value == "done":
            report.already.append(task_id)
            return False
        started, claim_owner = _pending(value)
        if time.time() - started < PENDING_STALE_S and (not owner or claim_owner != owner):
            report.already.append(task_id)  # another job is writing it right now
            return False
        # A writer died or failed mid-write: trust Label Studio, not the claim.
        if self._has_prediction(task_id, model_version):
            self.redis.set(key, "done", ex=DONE_TTL_S)
            report.already.append(task_id)
            return False
        # Take the claim over only if nobody else did meanwhile (two retries of one job).
        previous = self.redis.set(key, f"pending:{time.time()}:{owner}", ex=DONE_TTL_S, get=True)
        if (previous or b"").decode() != value:
            report.already.append(task_id)
            return False
        return True

    def _has_prediction(self, task_id: int, model_version: str) -> bool:
        return any(p.model_version == model_version for p in self.client.list_predictions(task_id=task_id))


def _pending(value: str) -> tuple[float, str | None]:
    """``pending:<time>[:<owner>]`` -> (time, owner); anything else counts as stale."""
    parts = value.split(":", 2)
    if len(parts) < 2 or parts[0] != "pending":
        return 0.0, None
    try:
        started = float(parts[1])
    except ValueError:
        return 0.0, None
    return started, parts[2] if len(parts) == 3 else None


# --- the write policy ------------------------------------------------------------------------


def is_transient(exc: LabelStudioError) -> bool:
    """Label Studio down, overloaded or unreachable: worth waiting for."""
    return exc.status_code is None or exc.status_code >= 500 or exc.status_code == 429


class Delivery:
    """How the worker writes a batch's predictions (see module doc)."""

    def __init__(self, writer: LabelStudioWriter, queue: QueueClient, patience_s: float) -> None:
        self.writer = writer
        self.queue = queue
        self.patience_s = patience_s

    def check_writable(self, result: BatchResult) -> None:
        """Fail the job now, as a synchronous write would, when there is no Label Studio to write to."""
        if self.writer.client is None and any(r.status == "ok" and r.task_id is not None for r in result.results):
            raise RuntimeError("cannot write predictions: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set")

    def write(self, project_id: int | None, result: BatchResult) -> int:
        """Write the batch's predictions; a prediction Label Studio refuses fails that task only.
        Returns how many predictions were written."""
        give_up_at = time.monotonic() + self.patience_s
        waits = 0
        while True:
            try:
                report = self.writer.write(project_id, result.results, result.model_version, owner=result.job_id)
                break
            except LabelStudioError as exc:
                if not is_transient(exc):
                    return self._fail_unwritten(result, str(exc), ErrorKind.ls_refused)
                waits += 1
                delay = backoff_s(waits, WAIT_BASE_S, WAIT_MAX_S)
                if time.monotonic() + delay > give_up_at:
                    return self._fail_unwritten(
                        result, f"Label Studio unavailable for {self.patience_s:.0f} s: {exc}", ErrorKind.ls_unavailable)
                log.warning("Label Studio write failed; waiting for it", extra={
                    "job_id": result.job_id, "retry_in_s": delay, "error": str(exc)})
                time.sleep(delay)
        for r in result.results:
            if r.task_id in report.refused:
                r.status, r.error_kind = "failed", ErrorKind.ls_refused
                r.error = f"Label Studio refused the prediction: {report.refused[r.task_id]}"
        if report.refused:
            self.queue.store_result(result)
        return len(report.written)

    def deliver_late(self, job: BatchJob, result: BatchResult) -> int:
        """An interactive result: /predict's to answer until its deadline, ours to write after it."""
        if self.queue.worker_must_deliver(job.job_id):
            n = self._write_late(job.project_id, result)
            log.info("delivered a late result past its deadline", extra={"job_id": job.job_id, "written": n})
            return n
        due = self.queue.handoff_due(job.job_id)
        if due is not None:
            # /predict may still answer; if it died waiting, the late sweep delivers after the deadline.
            self.queue.defer_delivery(job.job_id, job.project_id, due)
        return 0

    def deliver_due(self) -> int:
        """Write late results that nobody claimed by their deadline (the backend died or lost Redis
        while it waited). Called by the worker between jobs; returns how many predictions it wrote."""
        written = 0
        for job_id, project_id in self.queue.take_due_deliveries():
            result = self.queue.result(job_id)
            if result is None:
                log.warning("late result expired before delivery", extra={"job_id": job_id})
                continue
            if self.queue.worker_must_deliver(job_id):  # False when /predict answered with it after all
                n = self._write_late(project_id, result)
                log.info("delivered a late result nobody claimed", extra={"job_id": job_id, "written": n})
                written += n
        return written

    def _write_late(self, project_id: int | None, result: BatchResult) -> int:
        if self.writer.client is None:
            log.warning("late result kept in Redis only: no Label Studio credentials configured",
                        extra={"job_id": result.job_id})
            return 0
        return self.write(project_id, result)

    def _fail_unwritten(self, result: BatchResult, why: str, kind: ErrorKind) -> int:
        failed = 0
        for r in result.results:
            if (r.status == "ok" and r.task_id is not None
                    and not self.writer.is_written(result.model_version, r.task_id)):
                r.status, r.error_kind = "failed", kind
                r.error = f"prediction not written to Label Studio: {why}"
                failed += 1
        log.error("predictions not written to Label Studio", extra={"job_id": result.job_id, "tasks": failed,
                                                                    "error": why})
        self.queue.store_result(result)
        return 0
