"""Write finished predictions to Label Studio, exactly once per (task, model_version).

A Redis claim ``written:<model_version>:<task>`` is taken before writing. A claim
left ``pending`` by a worker that died mid-write is verified against Label
Studio (does the task already have a prediction of this version?) before anyone
writes again, so retries and crashes never create duplicates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from egm.contract import TaskResult, redis_key

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
        return redis_key(self.prefix, "written", model_version, task_id)

    def is_written(self, model_version: str, task_id: int) -> bool:
        return self.redis.get(self._claim_key(model_version, task_id)) == b"done"

    def write(self, project_id: int | None, results: list[TaskResult], model_version: str) -> WriteReport:
        report = WriteReport()
        todo = [r for r in results if r.status == "ok" and r.task_id is not None]
        if not todo:
            return report
        if self.client is None:
            raise RuntimeError("cannot write predictions: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not set")
        mine = [r for r in todo if self._claim(model_version, r.task_id, report)]
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
            # Label Studio unreachable or failing: release the claims so the retried job writes them.
            self.redis.delete(*[self._claim_key(model_version, r.task_id) for r in mine])
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

    def _claim(self, model_version: str, task_id: int, report: WriteReport) -> bool:
        key = self._claim_key(model_version, task_id)
        if self.redis.set(key, f"pending:{time.time()}", nx=True, ex=DONE_TTL_S):
            return True
        value = (self.redis.get(key) or b"").decode()
        if value == "done":
            report.already.append(task_id)
            return False
        started = float(value.split(":", 1)[1]) if value.startswith("pending:") else 0.0
        if time.time() - started < PENDING_STALE_S:
            report.already.append(task_id)  # another worker is writing it right now
            return False
        # A writer died mid-write: trust Label Studio, not the claim.
        if self._has_prediction(task_id, model_version):
            self.redis.set(key, "done", ex=DONE_TTL_S)
            report.already.append(task_id)
            return False
        self.redis.set(key, f"pending:{time.time()}", ex=DONE_TTL_S)
        return True

    def _has_prediction(self, task_id: int, model_version: str) -> bool:
        return any(p.model_version == model_version for p in self.client.list_predictions(task_id=task_id))
