"""A scene's true boxes written as an annotator's corrections of the model's prediction.

What a careful annotator does in Label Studio when a task opens with a prediction: keep a
predicted box that is right (same label, IoU >= :data:`KEEP_IOU` with a true box; its
region id stays, as Label Studio keeps it when a region is edited), move it onto the true
box, delete predicted boxes that match nothing, draw the missing ones, and submit. The
result is posted with ``parent_prediction`` set, so the export measures the corrections
against that prediction (accepted / moved / relabeled / deleted / added).

Boxes go through :mod:`egm.geometry` and :func:`egm.labelstudio.results.rectangle_item`, as the
workers write them; nothing here does coordinate arithmetic of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from egm.contract import BoxResult, LabelTarget
from egm.geometry import Box, grid_to_pixels, greedy_match, percent_from_value, percent_to_grid
from egm.labelstudio.results import rectangle_item, region_id
from egm.scenes import Scene

#: a predicted box this close to a true box of its label is edited (kept region), not redrawn.
KEEP_IOU = 0.3


@dataclass(frozen=True)
class Predicted:
    id: str
    label: str
    grid: Box


@dataclass
class Correction:
    result: list[dict]
    kept: int
    drawn: int
    deleted: int


def predicted_regions(result: list[dict], target: LabelTarget) -> list[Predicted]:
    """The rectangles of a prediction's result, on the 0..1000 grid."""
    out = []
    for item in result or []:
        if item.get("type") != "rectanglelabels" or item.get("from_name") != target.from_name:
            continue
        value = item.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if labels:
            out.append(Predicted(str(item.get("id")), str(labels[0]), percent_to_grid(percent_from_value(value))))
    return out


def correct(scene: Scene, predicted: list[Predicted], target: LabelTarget) -> Correction:
    """The annotation result that turns ``predicted`` into the scene's true boxes."""
    result: list[dict] = []
    kept = 0
    for label in dict.fromkeys(o.label for o in scene.objects):
        truth = [o for o in scene.objects if o.label == label]
        mine = [p for p in predicted if p.label == label]
        pairs = {i: j for i, j, iou in greedy_match([o.grid for o in truth], [p.grid for p in mine]) if iou >= KEEP_IOU}
        for i, obj in enumerate(truth):
            rid = mine[pairs[i]].id if i in pairs else region_id()
            kept += i in pairs
            box = BoxResult(label=label, grid=obj.grid.to_list(),
                            pixels=grid_to_pixels(obj.grid, scene.width, scene.height).to_list(2))
            result.append(rectangle_item(box, target, scene.width, scene.height, rid))
    return Correction(result=result, kept=kept, drawn=len(scene.objects) - kept, deleted=len(predicted) - kept)
