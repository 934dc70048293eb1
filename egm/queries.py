"""What to ask the model for one image: the queries of a task.

* A typed referring expression (interactive mode) -> one EGM referring prompt.
* Label-driven pre-annotation, ``EGM_PROMPT_MODE=multi`` (default) -> one Qwen3-VL
  multi-category prompt naming every label: one model call per image, whatever
  the number of labels, and the model labels each box itself.
* ``EGM_PROMPT_MODE=per_label`` -> one EGM referring prompt per label: what EGM
  was trained on (referring expressions), more accurate per label, but one call
  per label per image.

The label of a typed prompt's box (:func:`prompt_label`): the label the annotator selected
when Label Studio sends it, else the label the expression names ("the two yellow circles"
-> ``circle``; a ``predicted_values`` name counts for its label, matched as
:func:`egm.reasoning.first_label_named` matches), else the default (the labeling config's
``<Label default="true">`` or ``selected="true"``, else ``EGM_PROMPT_DEFAULT_LABEL``), else none: the request is answered with a message, never
silently with the config's first label.
"""

from __future__ import annotations

from egm.contract import LabelTarget, Query, TaskJob
from egm.prompts import PromptTemplates
from egm.reasoning import first_label_named


class TaskDataError(ValueError):
    """A task lacks the image its labeling config points at."""


def prompt_label(expression: str, target: LabelTarget, selected: str | None = None,
                 default: str | None = None) -> str | None:
    """The config label for a typed prompt's box; ``None`` when nothing says which (see module doc)."""
    if selected and selected in target.labels:
        return selected
    named = first_label_named(expression, [*target.labels, *target.aliases])
    if named is not None:
        return named if named in target.labels else target.aliases.get(named.lower())
    if default:
        return default if default in target.labels else target.aliases.get(default.strip().lower())
    return None


def build_queries(target: LabelTarget, templates: PromptTemplates, mode: str,
                  expression: str | None = None, label: str | None = None) -> list[Query]:
    """``label``: the label of a typed prompt's boxes (:func:`prompt_label`)."""
    if expression:
        return [Query(text=templates.referring_prompt(expression), label=label, expression=expression)]
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
