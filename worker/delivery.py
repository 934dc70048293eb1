"""Write finished predictions to Label Studio, exactly once per (task, model_version).

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

from egm.contract import TaskResult
from egm.keys import Keys

log = logging.getLogger(__name__)

PENDING_STALE_S = 60
DONE_TTL_S = 90 * 24 * 3600


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
