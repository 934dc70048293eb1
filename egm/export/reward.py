"""verl reward for the grounding rows written by ``egm-assist export --format grpo``.

Use it as verl's custom reward function (EGM's own launch script passes the same three
``reward_kwargs``; without them the defaults below apply)::

    custom_reward_function.path=<out>/grpo/reward.py custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.reward_type=mix
    +custom_reward_function.reward_kwargs.alpha=0.5
    +custom_reward_function.reward_kwargs.threshold=0.5

(verl >= 0.9 reads the same keys under ``reward.custom_reward_function``.)

The score depends on the row's ``data_source``:

``grounding`` (one box, EGM's rows)
    EGM's published reward (zgq1879/EGM, ``verl/verl/utils/reward_score/grounding.py``), case
    for case: the answer's box is the last innermost ``[...]`` of the whole completion
    (inside ``<answer>...</answer>`` first when there is one), read as its first four
    numbers; fewer than four numbers there -> no box; no bracket at all -> the last four
    numbers of the text. Corners are ordered, both boxes go to pixels of the image as
    EGM rounds them (``extra_info`` width/height), and the IoU is shaped by ``reward_type``:
    ``mix`` = ``alpha * [IoU >= threshold] + (1 - alpha) * IoU`` (EGM's setting: 0.5/0.5),
    ``sigmoid``, ``penalty``, ``normalized_exp``, ``eval`` (rows of split ``test`` are
    always scored ``eval``). No box, or a ground truth that is not four numbers, -> 0.

``grounding_multi`` (several instances of a label; this project's rows)
    Every ``[x1, y1, x2, y2]`` after ``</think>`` is an answer box; answer and truth boxes
    are paired greedily by IoU (as :func:`egm.geometry.greedy_match`), each pair is shaped
    as above, and the sum is divided by ``max(#answer, #truth)``: missing and extra boxes
    both cost. The ground truth is a flat list of ``4 * k`` numbers (or a list of boxes).

Deliberate deviations from EGM's file (docs/export.md lists them next to the parity table;
tests/test_reward.py tests each):

* ``reward_type`` / ``alpha`` / ``threshold`` missing -> ``mix`` / 0.5 / 0.5 (EGM raises);
* no ``width``/``height`` in ``extra_info`` -> IoU on the 0..1000 grid (EGM raises);
* a ground truth given as a numpy array or another sequence is read (EGM scores 0 unless
  it is a list or tuple; verl hands parquet lists over as lists);
* an unknown ``reward_type`` raises even for an answer without a box (EGM returns 0 first);
* a box thinner than a pixel at the right or bottom edge keeps one pixel (EGM makes it
  zero-wide there, so an exact answer scores 0);
* EGM prints one scored case in a thousand; this file prints nothing.

Any other ``data_source`` raises ``ValueError``: this file scores grounding rows only.

Standard library only: verl loads this file by path in its reward workers, where this
project is usually not installed; the exporter copies it next to the parquet files.
Its IoU and matching equal :mod:`egm.geometry`'s (pinned by a test).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

#: ``data_source`` / ``reward_model.style`` of the two kinds of rows.
SINGLE_SOURCE = "grounding"
MULTI_SOURCE = "grounding_multi"
SINGLE_STYLE = "rule"
MULTI_STYLE = "rule_multi_box"

GRID = 1000.0
DEFAULTS = {"reward_type": "mix", "alpha": 0.5, "threshold": 0.5}
REWARD_TYPES = ("mix", "sigmoid", "penalty", "normalized_exp", "eval")

# A number as EGM reads it: optional sign, digits with an optional fraction (no exponent).
_NUMBER = re.compile(r"[-+]?(?:\d*\.)?\d+")
# The contents of a bracket that holds no other bracket.
_INNER_BRACKET = re.compile(r"\[([^\[\]]+)\]")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_THINK_CLOSE = "</think>"

Box = tuple[float, float, float, float]


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  **kwargs: Any) -> float:
    """verl's custom-reward signature; ``kwargs`` are verl's ``reward_kwargs`` (others are ignored)."""
    options = _options(kwargs, extra_info)
    if data_source == SINGLE_SOURCE:
        return single_box_score(solution_str, ground_truth, extra_info, **options)
    if data_source == MULTI_SOURCE:
        return multi_box_score(solution_str, ground_truth, extra_info, **options)
    raise ValueError(f"reward.py scores data_source {SINGLE_SOURCE!r} and {MULTI_SOURCE!r}, "
                     f"not {data_source!r}")


def data_source_for(box_count: int) -> str:
    return SINGLE_SOURCE if box_count == 1 else MULTI_SOURCE


def _options(kwargs: dict, extra_info: Any) -> dict:
    reward_type = kwargs.get("reward_type") or DEFAULTS["reward_type"]
    if isinstance(extra_info, dict) and extra_info.get("split") == "test":
        reward_type = "eval"  # as EGM: test rows report accuracy at the threshold
    if reward_type not in REWARD_TYPES:
        raise ValueError(f"unknown reward_type {reward_type!r}; use one of {', '.join(REWARD_TYPES)}")
    alpha = kwargs.get("alpha")
    threshold = kwargs.get("threshold")
    return {"reward_type": reward_type,
            "alpha": float(DEFAULTS["alpha"] if alpha is None else alpha),
            "threshold": float(DEFAULTS["threshold"] if threshold is None else threshold)}


# --------------------------------------------------------------------------- one box (EGM)


def single_box_score(solution_str: Any, ground_truth: Any, extra_info: Any = None, *, reward_type: str = "mix",
                     alpha: float = 0.5, threshold: float = 0.5) -> float:
    answer = egm_answer_box(solution_str)
    truth = _four_numbers(ground_truth)
    if answer is None or truth is None:
        return 0.0
    size = _image_size(extra_info)
    if size is not None:
        answer, truth = egm_pixels(answer, *size), egm_pixels(truth, *size)
    value = iou(answer, truth)
    return _shape(value, reward_type, alpha, threshold) - _penalty(solution_str, reward_type)


def egm_answer_box(text: Any) -> Box | None:
    """The box EGM's reward reads from a completion (see the module note), corners ordered."""
    if not isinstance(text, str) or not text:
        return None
    tagged = _ANSWER_TAG.search(text)
    if tagged:
        box = _box_in(tagged.group(1))
        if box is not None:
            return box
    return _box_in(text)


def _box_in(text: str) -> Box | None:
    brackets = _INNER_BRACKET.findall(text)
    if brackets:
        numbers = _NUMBER.findall(brackets[-1])[:4]
    else:
        numbers = _NUMBER.findall(text)[-4:]
    if len(numbers) < 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in numbers)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def egm_pixels(box: Sequence[float], width: int, height: int) -> Box:
    """Grid -> pixels as EGM's reward does: round, clamp to the last pixel, at least one pixel wide.

    One deliberate difference: a box that collapses onto the last pixel column or row is
    widened inwards; EGM keeps it zero-wide, so even an exact answer scores 0 there.
    """
    def axis(lo: float, hi: float, size: int) -> tuple[float, float]:
        a = max(0, min(round(lo * size / GRID), size - 1))
        b = max(0, min(round(hi * size / GRID), size - 1))
        if a == b and size > 1:
            if b < size - 1:
                b = a + 1
            else:  # deviation: EGM leaves a box collapsed on the last pixel zero-wide (IoU 0 even if exact)
                a = size - 2
        return float(a), float(b)

    x1, x2 = axis(box[0], box[2], width)
    y1, y2 = axis(box[1], box[3], height)
    return x1, y1, x2, y2


def _four_numbers(value: Any) -> Box | None:
    values = _as_list(value)
    if values is None or len(values) != 4:
        return None
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return box if all(math.isfinite(v) for v in box) else None  # type: ignore[return-value]


def _image_size(extra_info: Any) -> tuple[int, int] | None:
    if not isinstance(extra_info, dict):
        return None
    try:
        width, height = int(extra_info["width"]), int(extra_info["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def _shape(value: float, reward_type: str, alpha: float, threshold: float) -> float:
    hit = 1.0 if value >= threshold else 0.0
    if reward_type in ("mix", "penalty"):
        return alpha * hit + (1.0 - alpha) * value
    if reward_type == "sigmoid":
        return 1.0 / (1.0 + math.exp(-8.0 * (value - threshold)))
    if reward_type == "normalized_exp":  # 0 at IoU 0, 1 at IoU 1, steep near 0 (base 16)
        return (1.0 - 16.0 ** -value) / (1.0 - 1.0 / 16.0)
    return hit  # eval


def _penalty(text: Any, reward_type: str) -> float:
    """EGM's ``penalty`` type: 0.01 per started 50 words past 512, 0.3 for a word repeated 7 times in a row."""
    if reward_type != "penalty":
        return 0.0
    words = ("" if text is None else str(text)).split()
    over = len(words) - 512
    length = ((over + 49) // 50) * 0.01 if over > 0 else 0.0
    run = 1
    repeated = False
    for prev, word in zip(words, words[1:]):
        run = run + 1 if word == prev else 1
        if run >= 7:
            repeated = True
            break
    return length + (0.3 if repeated else 0.0)


# --------------------------------------------------------------------------- several boxes


def multi_box_score(solution_str: Any, ground_truth: Any, extra_info: Any = None, *, reward_type: str = "mix",
                    alpha: float = 0.5, threshold: float = 0.5) -> float:
    truth = truth_boxes(ground_truth)
    if not truth or not isinstance(solution_str, str):
        return 0.0
    answers = answer_boxes(solution_str)
    if not answers:
        return 0.0
    size = _image_size(extra_info)
    if size is not None:
        answers = [egm_pixels(b, *size) for b in answers]
        truth = [egm_pixels(b, *size) for b in truth]
    total = sum(_shape(v, reward_type, alpha, threshold) for _, _, v in greedy_match(answers, truth))
    return total / max(len(answers), len(truth)) - _penalty(solution_str, reward_type)


def truth_boxes(ground_truth: Any) -> list[Box]:
    """Ground truth as ordered grid boxes: a flat list of ``4 * k`` numbers, or a list of boxes."""
    values = _as_list(ground_truth)
    if not values:
        return []
    if all(_as_list(v) is not None for v in values):
        groups = [_as_list(v) for v in values]
    elif len(values) % 4 == 0:
        groups = [values[i:i + 4] for i in range(0, len(values), 4)]
    else:
        return []
    boxes = [_four_numbers(g) for g in groups]
    if any(b is None for b in boxes):
        return []
    return [_ordered(b) for b in boxes if b is not None]


def answer_boxes(text: str) -> list[Box]:
    """Every four-number bracket of the answer part (after ``</think>`` when there is one)."""
    cut = text.rfind(_THINK_CLOSE)
    answer = text[cut + len(_THINK_CLOSE):] if cut >= 0 else text
    out = []
    for inner in _INNER_BRACKET.findall(answer):
        numbers = _NUMBER.findall(inner)
        if len(numbers) == 4 and _only_numbers(inner):
            out.append(_clamp_grid(_ordered(tuple(float(v) for v in numbers))))  # type: ignore[arg-type]
    return out


def _only_numbers(inner: str) -> bool:
    return not _NUMBER.sub("", inner).replace(",", "").strip()


def _ordered(b: Box) -> Box:
    return min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])


def _clamp_grid(b: Box) -> Box:
    x1, y1, x2, y2 = (min(GRID, max(0.0, v)) for v in b)
    return x1, y1, x2, y2


def _as_list(value: Any) -> list | None:
    if isinstance(value, (str, bytes, dict)) or value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays
        value = value.tolist()
    try:
        return list(value)
    except TypeError:
        return None


# --------------------------------------------------------------------------- geometry (as egm.geometry)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def greedy_match(a: list[Box], b: list[Box]) -> list[tuple[int, int, float]]:
    """Pairs by descending IoU, each box used once; pairs that do not overlap are left out."""
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
