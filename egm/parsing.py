"""EGM completion text -> reasoning, boxes on the 0..1000 grid, and a parse status.

EGM answers with a short reasoning, ``</think>``, then a fenced JSON list
``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` on Qwen3-VL's 0..1000 grid
(REFERENCE.md section 1). Real answers drift from that: no ``</think>``, no fence,
JSON cut off by the token limit, swapped corners, values outside the grid,
floats, numbers written as strings, a single object, bare ``[n, n, n, n]`` lists,
or prose only. :func:`parse_completion` recovers what it can, never raises, and
records every fix in ``notes``.

Where boxes come from, in order (EGM's evaluation parser, extended to several boxes):

1. every object with a ``bbox_2d`` (or ``bbox``) key, with its ``label``;
2. else every bare four-number list ``[n, n, n, n]``;
3. else the last four numbers of the answer (only when nothing box-like was cut off).

The search runs on the first code fence of the answer when there is one, else on the
whole answer (the text after ``</think>``). Each box is ordered and clamped with
:func:`egm.geometry.sanitize_grid`; degenerate boxes are kept (pixel conversion
grows them to the minimum size).

Status: ``ok`` = a clean fenced JSON list after ``</think>`` needing no fix;
``repaired`` = boxes recovered after at least one fix (listed in ``notes``);
``no_boxes`` = a well-formed "nothing found" answer (``[]`` or an explicit sentence);
``unparseable`` = no box could be recovered.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum

from egm.geometry import GRID, Box, sanitize_grid
from egm.lenient_json import NUMBER_PATTERN, Node, NumberRef, as_number, numbers_in_string, read_values

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: keys whose value is a box (compared lower-cased).
BBOX_KEYS = frozenset({"bbox_2d", "bbox", "bbox2d", "box_2d"})
#: keys whose value is the box's label, first found wins.
LABEL_KEYS = frozenset({"label", "category", "class", "name"})

#: an opening code fence with its info string (```json); JSON may follow on the same line.
_FENCE_OPEN_RE = re.compile(r"```[ \t]*[A-Za-z0-9_+.-]*")
#: where an answer starts when ``</think>`` is missing: a fence, or a bracket that opens JSON-ish content.
_ANSWER_START_RE = re.compile(r"```|[\[{](?=\s*[\[{\]\"'\d.+-])")
#: a number in prose, not glued to a word or another number ("x1", "10-20" give no sign to 20).
_PROSE_NUMBER_RE = re.compile(r"(?<![A-Za-z_\d.])" + NUMBER_PATTERN)
#: an answer that says there is nothing to box.
_NOTHING_FOUND_RE = re.compile(
    r"\b(?:not\s+(?:found|visible|present|shown|there|in\s+the\s+(?:image|picture|photo))"
    r"|no\s+(?:such|matching|objects?|boxes|results?)"
    r"|(?:cannot|can\s*not|can't|can’t|unable\s+to|could\s*not|couldn't|couldn’t)\s+"
    r"(?:find|locate|see|detect|identify|spot)"
    r"|(?:does\s*not|doesn't|doesn’t|do\s+not|don't|don’t)\s+(?:exist|appear)"
    r"|there\s+(?:is|are)\s+no|nothing|none|null)\b",
    re.IGNORECASE,
)


class ParseStatus(str, Enum):
    ok = "ok"
    repaired = "repaired"
    no_boxes = "no_boxes"
    unparseable = "unparseable"


@dataclass(frozen=True)
class ParsedBox:
    #: on the 0..1000 grid, ordered and clamped (``sanitize_grid``).
    box: Box
    label: str | None
    #: ``text[span[0]:span[1]]`` runs from the first character of the first number to the end of the last.
    span: tuple[int, int]
    #: this box needed a fix (swapped, clamped, non-integer, quoted numbers, bare list, fallback).
    repaired: bool = False
    #: span of each of the four numbers (used by :mod:`egm.confidence` to find the coordinate tokens).
    value_spans: tuple[tuple[int, int], ...] = ()


@dataclass
class ParsedCompletion:
    reasoning: str
    boxes: list[ParsedBox]
    status: ParseStatus
    notes: list[str] = field(default_factory=list)
    #: the text after ``</think>`` (or after the reasoning when it is missing), stripped.
    answer: str = ""
    #: the completion as given; ``ParsedBox.span`` indexes into it.
    text: str = ""

    @property
    def grid_boxes(self) -> list[Box]:
        return [b.box for b in self.boxes]


# --- public API -----------------------------------------------------------------

def parse_completion(text: str) -> ParsedCompletion:
    """Parse one EGM completion. Never raises; non-str input gives an ``unparseable`` result."""
    if not isinstance(text, str):
        note = f"completion is not a string ({type(text).__name__})"
        return ParsedCompletion("", [], ParseStatus.unparseable, [note], "", "")
    try:
        return _parse(text)
    except Exception as exc:  # a parser bug must not take a whole batch down
        return ParsedCompletion("", [], ParseStatus.unparseable, [f"internal parser error: {exc!r}"], "", text)


def format_completion(reasoning: str, boxes: list[tuple[list[float], str | None]]) -> str:
    """Write the canonical EGM answer (the SFT target format): reasoning, ``</think>``, fenced JSON list.

    Coordinates are rounded to ints; a ``None`` label is left out.
    """
    objects = [_format_object(coords, label) for coords, label in boxes]
    body = "[\n" + ",\n".join("\t" + obj for obj in objects) + "\n]" if objects else "[]"
    return f"{reasoning}\n{THINK_CLOSE}\n\n```json\n{body}\n```"


def _format_object(coords: list[float], label: str | None) -> str:
    if len(coords) != 4:
        raise ValueError(f"a box needs 4 coordinates, got {len(coords)}: {coords!r}")
    obj: dict[str, object] = {"bbox_2d": [int(round(float(v))) for v in coords]}
    if label is not None:
        obj["label"] = label
    return json.dumps(obj, ensure_ascii=False)


# --- the pipeline -----------------------------------------------------------------

@dataclass
class _Candidate:
    """Four numbers believed to be a box, before geometry checks."""

    numbers: list[NumberRef]
    label: str | None
    fixes: list[str] = field(default_factory=list)


@dataclass
class _Search:
    """What the box search saw, for the status decision."""

    candidates: list[_Candidate] = field(default_factory=list)
    fenced: bool = False
    #: something box-like was found (a bbox key, a numeric list), even if it was unusable.
    attempted: bool = False
    truncated: bool = False
    explicit_empty: bool = False
    #: the first JSON value of the searched region is an object (not the expected list).
    starts_with_object: bool = False


def _parse(text: str) -> ParsedCompletion:
    notes: list[str] = []
    reasoning, answer_start = _split_reasoning(text, notes)
    search = _search_boxes(text, answer_start, notes)
    boxes = _build_boxes(search.candidates, notes)
    if boxes and not search.fenced:
        notes.insert(0, "no code fence")
    answer = text[answer_start:].strip()
    status = _decide_status(boxes, search, answer, notes)
    if status == ParseStatus.unparseable:
        if search.truncated and "truncated JSON" not in notes:
            notes.append("truncated JSON")
        if not notes:
            notes.append("no box found in the answer")
    return ParsedCompletion(reasoning, boxes, status, notes, answer, text)


def _split_reasoning(text: str, notes: list[str]) -> tuple[str, int]:
    """Reasoning text and the offset where the answer starts."""
    close = text.find(THINK_CLOSE)
    if close >= 0:
        return _clean_reasoning(text[:close]), close + len(THINK_CLOSE)
    notes.append("missing </think>")
    m = _ANSWER_START_RE.search(text)
    if m is None:
        # Most likely cut off while still reasoning: all of it is reasoning, there is no answer.
        notes.append("no answer after the reasoning")
        return _clean_reasoning(text), len(text)
    return _clean_reasoning(text[:m.start()]), m.start()


def _clean_reasoning(raw: str) -> str:
    reasoning = raw.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):].strip()
    return reasoning


def _find_fence(text: str, start: int) -> tuple[int, int, bool] | None:
    """``(content_start, content_end, closed)`` of the first code fence at or after ``start``."""
    m = _FENCE_OPEN_RE.search(text, start)
    if m is None:
        return None
    close = text.find("```", m.end())
    return (m.end(), close, True) if close >= 0 else (m.end(), len(text), False)


def _search_boxes(text: str, answer_start: int, notes: list[str]) -> _Search:
    search = _Search()
    fence = _find_fence(text, answer_start)
    start, end = (fence[0], fence[1]) if fence else (answer_start, len(text))
    search.fenced = fence is not None
    _search_region(text, start, end, search, notes)
    if search.candidates:
        _note_format(text[start:end], fence, search, notes)
        return search
    if search.attempted or search.explicit_empty:
        return search
    if fence is not None:  # nothing inside the fence: look at the rest of the answer
        search.fenced = False
        _search_region(text, answer_start, len(text), search, notes)
        if search.candidates:
            notes.append("boxes found outside the code fence")
            return search
    if not (search.attempted or search.truncated or search.explicit_empty):
        cand = _candidate_from_last_numbers(text, answer_start, len(text))
        if cand is not None:
            search.candidates.append(cand)
    return search


def _search_region(text: str, start: int, end: int, search: _Search, notes: list[str]) -> None:
    read = read_values(text, start, end)
    search.truncated = search.truncated or read.truncated
    search.starts_with_object = bool(read.nodes) and read.nodes[0].kind == "object"
    if read.mismatched:
        notes.append("mismatched brackets")
    saw_key = _candidates_from_objects(read.nodes, search.candidates, notes)
    if saw_key:
        search.attempted = True
        return
    if _candidates_from_bare_lists(read.nodes, search.candidates, notes):
        search.attempted = True
        return
    search.explicit_empty = any(n.kind == "list" and n.complete and not n.items for n in read.nodes)


def _note_format(region: str, fence: tuple[int, int, bool] | None, search: _Search, notes: list[str]) -> None:
    """Notes on the JSON as a whole, once boxes were found in it."""
    if fence is not None and not fence[2]:
        notes.append("code fence not closed")
    if search.truncated:
        notes.append("truncated JSON")
    elif fence is not None and not _is_strict_json(region):
        notes.append("malformed JSON")
    if search.starts_with_object:
        notes.append("JSON is a single object, not a list")


def _is_strict_json(content: str) -> bool:
    try:
        json.loads(content)
    except (ValueError, RecursionError):
        return False
    return True


# --- candidates ---------------------------------------------------------------------

def _candidates_from_objects(nodes: list[Node], out: list[_Candidate], notes: list[str]) -> bool:
    """Boxes from objects with a bbox key; True when any such object was seen."""
    objects: list[Node] = []
    for node in nodes:
        _collect_box_objects(node, objects)
    for obj in objects:
        label = _label_of(obj, notes)
        value = obj.member(BBOX_KEYS)
        if value is not None:
            out.extend(_candidates_from_value(value, label, notes))
    return bool(objects)


def _collect_box_objects(node: Node, out: list[Node]) -> None:
    if node.kind == "object" and node.member(BBOX_KEYS) is not None:
        out.append(node)
        return
    for child in node.children():
        _collect_box_objects(child, out)


def _candidates_from_value(value: Node, label: str | None, notes: list[str]) -> list[_Candidate]:
    """The coordinates under a bbox key: a list, a list of lists, or a string holding the numbers."""
    if value.kind == "list" and value.items and all(item.kind == "list" for item in value.items):
        cands = [_candidate_from_list(item, label, notes) for item in value.items]
        for cand in cands:
            if cand is not None:
                cand.fixes.append("nested coordinate list")
        return [c for c in cands if c is not None]
    if value.kind == "list":
        cand = _candidate_from_list(value, label, notes)
        return [cand] if cand is not None else []
    if value.kind == "string" and value.complete:
        numbers = numbers_in_string(value)
        if len(numbers) == 4:
            return [_Candidate(numbers, label, ["coordinates written as a string"])]
        notes.append(f"skipped a box with {len(numbers)} values")
        return []
    notes.append("skipped a box cut off by truncation" if not value.complete else "skipped an unreadable box value")
    return []


def _candidate_from_list(node: Node, label: str | None, notes: list[str]) -> _Candidate | None:
    if not node.complete:
        notes.append("skipped a box cut off by truncation")
        return None
    numbers = [as_number(item) for item in node.items]
    if any(n is None for n in numbers):
        notes.append("skipped a box with non-numeric values")
        return None
    refs = [n for n in numbers if n is not None]
    if len(refs) != 4:
        notes.append(f"skipped a box with {len(refs)} values")
        return None
    fixes = ["numbers written as strings"] if any(r.quoted for r in refs) else []
    return _Candidate(refs, label, fixes)


def _label_of(obj: Node, notes: list[str]) -> str | None:
    value = obj.member(LABEL_KEYS)
    if value is None:
        return None
    if value.kind == "string" and not value.complete:
        notes.append("label cut off by truncation")
        return None
    if value.kind in ("string", "number", "word"):
        return value.text.strip() or None
    return None


def _candidates_from_bare_lists(nodes: list[Node], out: list[_Candidate], notes: list[str]) -> bool:
    """Boxes from four-number lists anywhere in the tree; True when any numeric list was seen."""
    seen = False
    for node in nodes:
        seen = _collect_bare_lists(node, None, out, notes) or seen
    return seen


def _collect_bare_lists(node: Node, label: str | None, out: list[_Candidate], notes: list[str]) -> bool:
    if node.kind == "object":
        label = _label_of(node, []) or label
    if node.kind == "list" and len(node.items) >= 2 and all(as_number(i) is not None for i in node.items):
        cand = _candidate_from_list(node, label, notes)
        if cand is not None:
            cand.fixes.append("bare coordinate list")
            out.append(cand)
        return True
    seen = False
    for child in node.children():
        seen = _collect_bare_lists(child, label, out, notes) or seen
    return seen


def _candidate_from_last_numbers(text: str, start: int, end: int) -> _Candidate | None:
    matches = list(_PROSE_NUMBER_RE.finditer(text, start, end))
    if len(matches) < 4:
        return None
    # float() cannot fail on a NUMBER_PATTERN match; huge literals become inf and are dropped later.
    refs = [NumberRef(float(m.group()), m.start(), m.end()) for m in matches[-4:]]
    return _Candidate(refs, None, ["taken from the last four numbers of the answer"])


# --- boxes and status -----------------------------------------------------------------

def _build_boxes(cands: list[_Candidate], notes: list[str]) -> list[ParsedBox]:
    built: list[tuple[ParsedBox, list[str]]] = []
    for cand in cands:
        item = _to_parsed_box(cand, notes)
        if item is not None:
            built.append(item)
    built = _dedupe(built, notes)
    for i, (_, fixes) in enumerate(built, start=1):
        notes.extend(f"box {i}: {fix}" for fix in fixes)
    return [box for box, _ in built]


def _to_parsed_box(cand: _Candidate, notes: list[str]) -> tuple[ParsedBox, list[str]] | None:
    values = [n.value for n in cand.numbers]
    if not all(math.isfinite(v) for v in values):
        notes.append("dropped a box with a non-finite value (NaN/inf)")
        return None
    raw = Box.from_list(values)
    fixes = list(cand.fixes)
    if not raw.is_ordered:
        fixes.append("corners swapped")
    if any(v < 0 or v > GRID for v in values):
        fixes.append("values clamped to 0-1000")
    if not all(v.is_integer() for v in values):
        fixes.append("non-integer values")
    span = (cand.numbers[0].start, cand.numbers[-1].end)
    value_spans = tuple((n.start, n.end) for n in cand.numbers)
    return ParsedBox(sanitize_grid(raw), cand.label, span, bool(fixes), value_spans), fixes


def _dedupe(built: list[tuple[ParsedBox, list[str]]], notes: list[str]) -> list[tuple[ParsedBox, list[str]]]:
    seen: set[tuple[tuple[float, ...], str | None]] = set()
    kept: list[tuple[ParsedBox, list[str]]] = []
    for item in built:
        key = (tuple(item[0].box.to_list()), item[0].label)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    dropped = len(built) - len(kept)
    if dropped:
        notes.append(f"removed {dropped} duplicate box{'es' if dropped > 1 else ''}")
    return kept


def _decide_status(boxes: list[ParsedBox], search: _Search, answer: str, notes: list[str]) -> ParseStatus:
    if boxes:
        return ParseStatus.repaired if notes else ParseStatus.ok
    if search.attempted:
        return ParseStatus.unparseable
    if search.explicit_empty or (answer and _NOTHING_FOUND_RE.search(answer)):
        return ParseStatus.no_boxes
    return ParseStatus.unparseable
