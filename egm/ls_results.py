"""Boxes -> Label Studio ``result`` items (rectanglelabels, plus per-region reasoning), and the message item
that tells an annotator why an interactive request gave no box."""

from __future__ import annotations

import uuid

from egm.contract import BoxResult, LabelTarget
from egm.geometry import Box, grid_to_percent


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
    """Per-region TextArea result: same region id, same geometry, the model's reasoning as text."""
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


def build_result(boxes: list[BoxResult], target: LabelTarget, width: int, height: int, reasoning: str) -> list[dict]:
    """Label Studio result list for one task; region ids are unique within and across tasks."""
    items: list[dict] = []
    for box in boxes:
        rect = rectangle_item(box, target, width, height, region_id())
        items.append(rect)
        if target.reasoning_from_name and reasoning:
            items.append(reasoning_item(rect, target, reasoning))
    return items


def message_item(from_name: str, to_name: str, text: str) -> dict:
    """A non-per-region TextArea result carrying one line for the annotator (why no box came back)."""
    return {"id": region_id(), "from_name": from_name, "to_name": to_name, "type": "textarea",
            "value": {"text": [" ".join(text.split())]}}
