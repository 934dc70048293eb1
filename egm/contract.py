"""The queue contract between whoever enqueues work (ML backend, CLI) and the workers.

Defined once here and imported by both sides: queue names, the job payload and
the job result. Payloads carry task *references* (ids, image URLs, prompts),
never image bytes, so Redis stays small and a job can be retried anywhere.

One RQ job is one *batch* of tasks: the worker hands the whole batch to the
engine in one call. Interactive requests are batches of the tasks of one
``/predict`` call and go to their own queue, which every worker polls first.

Queues are per ``model_version`` (``<prefix>-interactive@<version>``): a job carries the
version it was planned for and only a worker serving that version ever takes it, so no
answer is computed, cached or written under the name of another model (egm.identity).
"""

from __future__ import annotations

import time
import uuid
from enum import Enum, StrEnum
from typing import Literal

from pydantic import BaseModel, Field

#: Dotted path of the function RQ runs for a batch job (imported lazily by the worker).
BATCH_FUNC = "egm.worker.rq_entry.run_batch"


class Priority(str, Enum):
    interactive = "interactive"
    bulk = "bulk"


VERSION_SEPARATOR = "@"


def queue_name(prefix: str, priority: Priority, model_version: str) -> str:
    return f"{prefix}-{priority.value}{VERSION_SEPARATOR}{model_version}"


def parse_queue_name(prefix: str, name: str) -> tuple[Priority, str] | None:
    """``(priority, model_version)`` of one of this prefix's queues, else None."""
    for priority in Priority:
        head = f"{prefix}-{priority.value}{VERSION_SEPARATOR}"
        if name.startswith(head) and len(name) > len(head):
            return priority, name[len(head):]
    return None


class ErrorKind(StrEnum):
    """Why a task failed (``TaskResult.error_kind``); the value is what Redis, JSON and the run's
    failed list carry. :attr:`is_transient` says whether trying the task again later may succeed."""

    #: the image could not be downloaded or read (a server or a file may come back).
    image_fetch = "image:fetch"
    #: the URL or path is refused by policy (egm.images.url_guard).
    image_blocked = "image:blocked"
    image_too_large = "image:too_large"
    #: empty, corrupt or truncated image data.
    image_decode = "image:decode"
    image_unsupported = "image:unsupported"
    #: the task asks nothing (no queries).
    request = "request"
    #: the engine failed for this request.
    engine = "engine"
    #: the answer holds no readable box list.
    parse = "parse"
    #: Label Studio was unreachable past the worker's patience: the prediction can be written later.
    ls_unavailable = "label_studio:unavailable"
    #: Label Studio refused the write (4xx: the task was deleted, ...).
    ls_refused = "label_studio:refused"
    #: no worker of the job's model_version took it in time (egm.unserved).
    version = "version"
    #: the whole batch job failed after RQ's retries (the worker died with it, ...).
    batch = "batch"

    @classmethod
    def of_image(cls, image_kind: str) -> "ErrorKind":
        """The kind of an ``ImageLoadError`` of kind ``image_kind`` (``fetch``, ``decode``, ...)."""
        return cls(f"image:{image_kind}")

    @property
    def is_transient(self) -> bool:
        return self in TRANSIENT_ERROR_KINDS


#: Failures worth another try later (bulk runs retry them with backoff, egm.bulk.retries).
TRANSIENT_ERROR_KINDS = frozenset({ErrorKind.image_fetch, ErrorKind.engine, ErrorKind.ls_unavailable})


def is_transient(kind: str | None) -> bool:
    """Whether a task that failed with ``kind`` may succeed when tried again (unknown kinds: no)."""
    return kind in TRANSIENT_ERROR_KINDS


class LabelTarget(BaseModel):
    """Where boxes go in the labeling config, and which labels they may carry."""

    from_name: str
    to_name: str
    labels: list[str]
    #: model label (lower-cased) -> config label, from ``predicted_values`` and the labels themselves.
    aliases: dict[str, str] = Field(default_factory=dict)
    #: per-region TextArea that shows the model's reasoning next to each box (that box's label's part).
    reasoning_from_name: str | None = None
    #: task-level TextArea (not per region) that shows the whole reasoning about the image once.
    image_reasoning_from_name: str | None = None
    #: key of the image in ``task.data``.
    image_key: str = "image"

    def resolve_label(self, model_label: str | None, fallback: str | None = None) -> str | None:
        """Map a label the model wrote onto a config label; ``None`` when it matches none."""
        if model_label:
            key = model_label.strip().lower()
            if key in self.aliases:
                return self.aliases[key]
        if fallback is not None:
            return self.aliases.get(fallback.strip().lower(), fallback if fallback in self.labels else None)
        if len(self.labels) == 1:
            return self.labels[0]
        return None


class Query(BaseModel):
    """One model call for one image: the full user text, and the label its boxes get."""

    text: str
    #: label assigned to every box of the answer (referring / per-label prompts); ``None`` = use the model's labels.
    label: str | None = None
    #: what the user typed, when the query comes from an interactive prompt.
    expression: str | None = None


class TaskJob(BaseModel):
    task_id: int | None = None
    #: stable reference for tasks outside Label Studio (file path, URL, manifest key).
    ref: str | None = None
    image: str
    queries: list[Query]


class BatchJob(BaseModel):
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    priority: Priority = Priority.bulk
    project_id: int | None = None
    model_version: str
    target: LabelTarget
    tasks: list[TaskJob]
    #: bulk runs: the worker writes predictions to Label Studio itself.
    write_to_label_studio: bool = False
    #: interactive jobs: if /predict stops waiting, the worker writes the result to Label Studio.
    #: Off for typed-prompt requests, whose answer only makes sense in the annotator's session.
    deliver_late: bool = True
    #: bulk run this batch belongs to (progress counters), if any.
    run_id: str | None = None
    created_at: float = Field(default_factory=time.time)


class BoxResult(BaseModel):
    label: str
    #: ``[x1, y1, x2, y2]`` on the 0..1000 grid of the upright image.
    grid: list[float]
    #: ``[x1, y1, x2, y2]`` in pixels of the upright image.
    pixels: list[float]
    score: float | None = None
    #: what the model wrote as label.
    model_label: str | None = None


class TaskResult(BaseModel):
    task_id: int | None = None
    ref: str | None = None
    status: Literal["ok", "failed"]
    error: str | None = None
    #: why the task failed (see :class:`ErrorKind`).
    error_kind: ErrorKind | None = None
    reasoning: str = ""
    boxes: list[BoxResult] = Field(default_factory=list)
    parse_status: str | None = None
    width: int | None = None
    height: int | None = None
    score: float | None = None
    #: the Label Studio ``result`` list (rectanglelabels + reasoning textareas).
    ls_result: list[dict] = Field(default_factory=list)
    completions: list[str] = Field(default_factory=list)
    cached: bool = False
    gpu_seconds: float | None = None


class BatchResult(BaseModel):
    job_id: str
    #: the identity of the worker that computed the results (for a job failed because no worker of
    #: its version came: the version it was planned for, with nothing computed).
    model_version: str
    worker: str | None = None
    results: list[TaskResult]
    finished_at: float = Field(default_factory=time.time)
