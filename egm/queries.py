"""What to ask the model for one image: the queries of a task.

* A typed referring expression (interactive mode) -> one EGM referring prompt.
* Label-driven pre-annotation, ``EGM_PROMPT_MODE=multi`` (default) -> one Qwen3-VL
  multi-category prompt naming every label: one model call per image, whatever
  the number of labels, and the model labels each box itself.
* ``EGM_PROMPT_MODE=per_label`` -> one EGM referring prompt per label: what EGM
  was trained on (referring expressions), more accurate per label, but one call
  per label per image.
"""

from __future__ import annotations

from egm.contract import LabelTarget, Query, TaskJob
from egm.prompts import PromptTemplates


class TaskDataError(ValueError):
    """A task lacks the image its labeling config points at."""


def build_queries(target: LabelTarget, templates: PromptTemplates, mode: str,
                  expression: str | None = None) -> list[Query]:
    if expression:
        return [Query(text=templates.referring_prompt(expression), expression=expression)]
    if mode == "per_label":
        return [Query(text=templates.referring_prompt(label), label=label) for label in target.labels]
    return [Query(text=templates.multi_prompt(target.labels))]


def image_of(task_data: dict, image_key: str) -> str:
    value = task_data.get(image_key)
    if not isinstance(value, str) or not value.strip():
        raise TaskDataError(f"task data has no image under {image_key!r} (keys: {sorted(task_data)[:10]})")
    return value.strip()


def task_job(task_id: int | None, image: str, queries: list[Query], ref: str | None = None) -> TaskJob:
    return TaskJob(task_id=task_id, ref=ref, image=image, queries=queries)
