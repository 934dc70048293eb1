"""Ask the workers for a short rationale of a human-corrected box (how EGM built its SFT set).

For each sample whose boxes a human corrected, the model gets the EGM referring prompt
plus the corrected answer as a hint; the reasoning it writes before ``</think>`` becomes
the sample's reasoning. A rationale is kept only when the answer the model gives with
it agrees with the human boxes (EGM reward >= ``min_score``, i.e. IoU >= 0.5 for one
box), so a rationale that argues for another object never enters the data set.

Jobs go through the normal bulk queue (:mod:`egm.queue`) of the version the live workers serve
(:mod:`egm.fleet`; the command waits for one up to its timeout); they are never written to Label
Studio. Samples without a usable rationale in time stay
answer-only. ``submit`` and ``collect`` are separate so a caller (or a test) can run a
worker in between.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from egm.config.settings import Settings
from egm.contract import BatchJob, LabelTarget, Priority, Query, TaskJob
from egm.export.reward import compute_score, data_source_for
from egm.export.samples import Sample
from egm.fleet import Fleet
from egm.parsing import parse_completion
from egm.queue import QueueClient

log = logging.getLogger(__name__)

DEFAULT_PROMPT = ("Locate {expression}, output its bbox coordinates using JSON format. "
                  "Hint: the correct answer is {boxes}.")
MAX_RATIONALE_CHARS = 1200
#: EGM reward of the model's own answer needed to keep its rationale (0.75 = IoU 0.5 on one box).
DEFAULT_MIN_SCORE = 0.75


@dataclass
class RationaleRequest:
    job_ids: list[str] = field(default_factory=list)
    #: job-task reference -> sample
    samples: dict[str, Sample] = field(default_factory=dict)


def rationale_prompt(sample: Sample, template: str = DEFAULT_PROMPT) -> str:
    boxes = json.dumps([{"bbox_2d": [int(round(v)) for v in b.to_list()], "label": sample.query}
                        for b in sample.boxes])
    return template.replace("{expression}", sample.query.strip()).replace("{boxes}", boxes)


class RationaleClient:
    def __init__(self, settings: Settings, target: LabelTarget, project_id: int | None = None,
                 queue: QueueClient | None = None, template: str = DEFAULT_PROMPT,
                 min_score: float = DEFAULT_MIN_SCORE) -> None:
        self.settings = settings
        self.target = target
        self.project_id = project_id
        self.queue = queue or QueueClient(settings)
        self.template = template
        self.min_score = min_score

    def live_version(self, wait_s: float) -> str:
        """The live workers' version, waiting up to ``wait_s`` for one (:class:`egm.fleet.FleetError` if none)."""
        fleet = Fleet.from_settings(self.settings, self.queue.redis)
        view = fleet.wait_for_ready(wait_s, start_timeout_s=max(wait_s, 0.0))
        return view.version_for_planning(self.settings)

    def submit(self, samples: list[Sample], model_version: str | None = None) -> RationaleRequest:
        request = RationaleRequest()
        version = model_version or self.live_version(0.0)
        size = max(1, self.settings.batch_size)
        jobs = []
        for start in range(0, len(samples), size):
            tasks = []
            for k, sample in enumerate(samples[start:start + size], start=start):
                ref = f"rationale:{k}:{sample.id}"
                request.samples[ref] = sample
                tasks.append(TaskJob(task_id=sample.task_id, ref=ref, image=sample.image.source,
                                     queries=[Query(text=rationale_prompt(sample, self.template),
                                                    label=sample.label)]))
            jobs.append(BatchJob(priority=Priority.bulk, project_id=self.project_id, model_version=version,
                                 target=self.target, tasks=tasks, write_to_label_studio=False,
                                 deliver_late=False))
        if jobs:
            self.queue.enqueue_many(jobs)
        request.job_ids = [j.job_id for j in jobs]
        return request

    def collect(self, request: RationaleRequest, timeout_s: float) -> dict[str, str]:
        """Rationales by sample id, for those that came back usable before the deadline."""
        deadline = time.time() + max(0.0, timeout_s)
        pending = list(request.job_ids)
        out: dict[str, str] = {}
        while pending:
            done = [j for j in pending if self.queue.result(j) is not None]
            if not done:
                job_id = self.queue.wait_any(pending, deadline)
                if job_id is None:
                    break
                done = [job_id] if job_id in pending else []
            for job_id in done:
                pending.remove(job_id)
                self._take(self.queue.result(job_id), request, out)
        if pending:
            log.warning("rationales not back in time; those samples stay answer-only",
                        extra={"jobs_pending": len(pending)})
        return out

    def _take(self, result, request: RationaleRequest, out: dict[str, str]) -> None:
        if result is None:
            return
        for task in result.results:
            sample = request.samples.get(task.ref or "")
            if sample is None or not task.completions:
                continue
            text = usable_rationale(task.completions[0], sample, self.min_score)
            if text:
                out[sample.id] = text


def usable_rationale(completion: str, sample: Sample, min_score: float = DEFAULT_MIN_SCORE) -> str | None:
    """The reasoning of ``completion`` when its answer agrees with the sample's boxes."""
    parsed = parse_completion(completion)
    reasoning = parsed.reasoning.strip()
    if not reasoning:
        return None
    truth = [v for b in sample.boxes for v in b.to_list()]
    size = {"width": sample.image.width, "height": sample.image.height}
    if compute_score(data_source_for(len(sample.boxes)), parsed.answer or completion, truth, size) < min_score:
        return None
    return reasoning[:MAX_RATIONALE_CHARS].strip()
