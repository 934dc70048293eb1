"""Interactive requests (Auto-Annotation on): what an annotator gets back for a typed prompt.

Label Studio 1.23 calls ``/predict`` with ``params.context`` in two cases:

* a typed prompt (Shift+Enter in the prompt TextArea): the context holds it as a ``textarea``
  item. The answer is the box the expression refers to, labeled by
  :func:`egm.queries.prompt_label`, minus any box that duplicates a region the task already has;
* every Submit: ``{"result": []}``, no prompt. Nothing new is suggested: one empty answer per
  task, at once, no job queued (it used to re-suggest every box of the task just saved).

Regions the task "already has", compared by IoU (``egm.geometry``) against each suggested box:
the rectangles of the context's ``result`` (``rectanglelabels``/``rectangle`` items with
geometry) and those of the task's predictions, annotations and drafts, which Label Studio
sends with the task on interactive calls. A suggested box with IoU >= ``DUPLICATE_IOU`` with
any of them (whatever its label: it is the same object) is dropped.

Label Studio shows the first result it gets back, and nothing for ``[]``. So when a typed
prompt yields no box (no label applies, no worker, a failure, no answer within the budget,
nothing found, only duplicates), the answer is one ``textarea`` item in the config's message
TextArea (``LabelingConfig.message_from_name``) with one line saying why, score 0. A config
without such a TextArea gets ``[]`` as before, and the reason is logged.
"""

from __future__ import annotations

import logging
from typing import Any

from egm.backend.models import Prediction, Task
from egm.geometry import Box, percent_from_value, percent_to_grid
from egm.labelstudio.config import LabelingConfig, context_rectangles, result_rectangles
from egm.labelstudio.results import message_item

log = logging.getLogger(__name__)

#: a suggested box overlapping an existing region at least this much is the same object.
DUPLICATE_IOU = 0.5
_TASK_RESULT_FIELDS = ("predictions", "annotations", "drafts")


def existing_boxes(context: Any, task: Task) -> list[Box]:
    """The task's regions on the 0..1000 grid: the context's rectangles and those of its predictions,
    annotations and drafts (when Label Studio sent them with the task)."""
    values = list(context_rectangles(context))
    extra = task.model_extra or {}
    for name in _TASK_RESULT_FIELDS:
        items = extra.get(name)
        for entry in items if isinstance(items, list) else []:
            if isinstance(entry, dict) and not entry.get("was_cancelled"):
                values.extend(result_rectangles(entry.get("result")))
    boxes = []
    for value in values:
        try:
            boxes.append(percent_to_grid(percent_from_value(value)))
        except (KeyError, TypeError, ValueError):
            continue
    return boxes


def drop_duplicates(result: list[dict], existing: list[Box], min_iou: float = DUPLICATE_IOU) -> tuple[list[dict], int]:
    """``result`` without the rectangles (and their per-region items) that overlap an existing region;
    also how many rectangles were dropped."""
    if not existing:
        return result, 0
    dropped: set[str] = set()
    for item in result:
        if item.get("type") != "rectanglelabels":
            continue
        box = percent_to_grid(percent_from_value(item["value"]))
        if any(box.iou(other) >= min_iou for other in existing):
            dropped.add(item.get("id"))
    return [item for item in result if item.get("id") not in dropped], len(dropped)


def message(config: LabelingConfig, text: str, model_version: str | None) -> Prediction | list:
    """What the annotator sees instead of a box: the reason in the message TextArea, score 0
    (``[]`` and a log line when the config has no TextArea for it)."""
    if config.message_from_name is None:
        log.warning("interactive request gave no box; the labeling config has no message TextArea to say why",
                    extra={"reason": text})
        return []
    log.info("interactive request answered with a message", extra={"reason": text})
    item = message_item(config.message_from_name, config.target.to_name, text)
    return Prediction(result=[item], score=0.0, model_version=model_version or "")
