"""Boxes -> Label Studio ``result`` items: rectanglelabels, each box's own reasoning, the image's reasoning,
and the message item that tells an annotator why an interactive request gave no box.

A model answer has one reasoning text for the whole image. In Label Studio it is shown twice,
each part where it belongs:

* per box, in the config's per-region TextArea (``target.reasoning_from_name``): only the part
  about that box's label, cut by :func:`egm.reasoning.reasoning_for_label` (the one owner of
  that split). A box whose label the text never names gets no per-region text: better none
  than reasoning about another object. A typed referring expression was asked on its own, so
  its whole reasoning is about its box(es);
* once per task, in the config's task-level TextArea named ``image_reasoning``
  (``target.image_reasoning_from_name``): the whole text, so nothing the model wrote is lost.
  Not for a typed prompt: its suggestion must not overwrite the task's text.
"""

from __future__ import annotations

import uuid

from egm.contract import BoxResult, LabelTarget
from egm.geometry import Box, grid_to_percent
from egm.reasoning import reasoning_for_label


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def rectangle_item(box: BoxResult, target: LabelTarget, width: int, height: int, rid: str) -> dict:
    rect = grid_to_percent(Box.from_list(box.grid))
    item = {
        "id": rid,
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {**rect.as_value(), "rectanglelabels": [box.label]},
    }
    if box.score is not None:
        item["score"] = round(float(box.score), 4)
    return item


def reasoning_item(rect_item: dict, target: LabelTarget, reasoning: str) -> dict:
    """Per-region TextArea result: same region id, same geometry, the box's reasoning as text."""
    value = {k: rect_item["value"][k] for k in ("x", "y", "width", "height", "rotation")}
    return {
        "id": rect_item["id"],
        "from_name": target.reasoning_from_name,
        "to_name": target.to_name,
        "type": "textarea",
        "original_width": rect_item["original_width"],
        "original_height": rect_item["original_height"],
        "image_rotation": 0,
        "value": {**value, "text": [reasoning]},
    }


def image_reasoning_item(target: LabelTarget, reasoning: str) -> dict:
    """Task-level TextArea result (no region): the whole reasoning, once per task."""
    return {
        "id": region_id(),
        "from_name": target.image_reasoning_from_name,
        "to_name": target.to_name,
        "type": "textarea",
        "value": {"text": [reasoning]},
    }


def box_reasoning(reasoning: str, label: str, target: LabelTarget, referring: bool = False) -> str:
    """The part of ``reasoning`` a box labelled ``label`` shows; ``""`` when no part is about it."""
    if referring:
        return (reasoning or "").strip()
    return reasoning_for_label(reasoning, label, target.labels, target.aliases)


def build_result(boxes: list[BoxResult], target: LabelTarget, width: int, height: int, reasoning: str,
                 *, referring: bool = False) -> list[dict]:
    """Label Studio result list for one task; region ids are unique within and across tasks.

    ``referring``: the answer is to a typed referring expression (its reasoning is all about it).
    """
    items: list[dict] = []
    for box in boxes:
        rect = rectangle_item(box, target, width, height, region_id())
        items.append(rect)
        text = box_reasoning(reasoning, box.label, target, referring) if target.reasoning_from_name else ""
        if text:
            items.append(reasoning_item(rect, target, text))
    if target.image_reasoning_from_name and (reasoning or "").strip() and not referring:
        items.append(image_reasoning_item(target, reasoning.strip()))
    return items


def message_item(from_name: str, to_name: str, text: str) -> dict:
    """A non-per-region TextArea result carrying one line for the annotator (why no box came back)."""
    return {"id": region_id(), "from_name": from_name, "to_name": to_name, "type": "textarea",
            "value": {"text": [" ".join(text.split())]}}
