"""verl reward for grounding rows written by ``egm-assist export --format grpo``.

Use it as verl's custom reward function::

    custom_reward_function.path=<out>/grpo/reward.py custom_reward_function.name=compute_score

EGM's reward for one box (REFERENCE.md 1): take the LAST ``[x1, y1, x2, y2]`` of the answer,
score ``0.5 * [IoU >= 0.5] + 0.5 * IoU`` against the ground truth on the 0..1000 grid; an
answer without a box scores 0.

Several boxes (a label with several instances; the ground truth is then a flat list of
``4 * k`` numbers, or a list of ``k`` boxes): every box of the answer is read, answer and
truth boxes are paired greedily by IoU, each pair scores as above, and the sum is divided
by ``max(len(answer), len(truth))``: missing and extra boxes both cost.

This file imports nothing outside the standard library because verl loads it by path in
its reward workers, where this project is usually not installed; the exporter copies it
next to the parquet files. Its box arithmetic mirrors ``egm.geometry`` (ordered corners
clamped to the grid, IoU, greedy matching).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

GRID = 1000.0
IOU_THRESHOLD = 0.5

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(r"\[\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*,\s*("
                     + _NUMBER + r")\s*\]")
_THINK_CLOSE = "</think>"

Box = tuple[float, float, float, float]


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """verl's reward signature; returns a score in [0, 1]."""
    truth = truth_boxes(ground_truth)
    if not truth or not isinstance(solution_str, str):
        return 0.0
    if len(truth) == 1:
        answer = last_box(solution_str)
        return 0.0 if answer is None else box_score(iou(answer, truth[0]))
    answers = answer_boxes(solution_str)
    if not answers:
        return 0.0
    total = sum(box_score(v) for _, _, v in greedy_match(answers, truth))
    return total / max(len(answers), len(truth))


def box_score(value: float) -> float:
    return 0.5 * (1.0 if value >= IOU_THRESHOLD else 0.0) + 0.5 * value


# --------------------------------------------------------------------------- reading


def truth_boxes(ground_truth: Any) -> list[Box]:
    """Ground truth as boxes: ``[x1,y1,x2,y2]``, a flat ``4*k`` list, or a list of boxes."""
    values = _as_list(ground_truth)
    if values is None or not values:
        return []
    if all(_as_list(v) is not None for v in values):
        boxes = [_box(_as_list(v)) for v in values]
    elif len(values) % 4 == 0:
        boxes = [_box(values[i:i + 4]) for i in range(0, len(values), 4)]
    else:
        return []
    return [b for b in boxes if b is not None]


def _as_list(value: Any) -> list | None:
    if isinstance(value, (str, bytes, dict)) or value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays, as verl hands parquet lists over
        value = value.tolist()
    try:
        return list(value)
    except TypeError:
        return None


def _box(values: Sequence[Any] | None) -> Box | None:
    if values is None or len(values) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return _sanitize((x1, y1, x2, y2))


def _sanitize(b: Box) -> Box:
    x1, y1, x2, y2 = min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])
    clamp = lambda v: min(GRID, max(0.0, v))  # noqa: E731
    return clamp(x1), clamp(y1), clamp(x2), clamp(y2)


def _all_boxes(text: str) -> list[Box]:
    out = []
    for m in _BOX_RE.finditer(text):
        box = _box(m.groups())
        if box is not None:
            out.append(box)
    return out


def last_box(text: str) -> Box | None:
    """EGM's RL parser: the last ``[n, n, n, n]`` of the whole answer."""
    boxes = _all_boxes(text)
    return boxes[-1] if boxes else None


def answer_boxes(text: str) -> list[Box]:
    """Every box of the answer part (after ``</think>`` when present)."""
    cut = text.rfind(_THINK_CLOSE)
    return _all_boxes(text[cut + len(_THINK_CLOSE):] if cut >= 0 else text)


# --------------------------------------------------------------------------- geometry


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_match(a: list[Box], b: list[Box]) -> list[tuple[int, int, float]]:
    """Pairs by descending IoU, each box used once (pairs with IoU 0 are left out)."""
    pairs = sorted(((iou(x, y), i, j) for i, x in enumerate(a) for j, y in enumerate(b)), reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for value, i, j in pairs:
        if value <= 0 or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        out.append((i, j, value))
    return out
