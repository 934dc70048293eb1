"""Label Studio ``result`` lists -> boxes on the 0..1000 grid, with their texts.

A rectangle region is a ``rectanglelabels`` item; its percent geometry goes
through :mod:`egm.geometry` (``percent_from_value`` -> ``percent_to_grid``), so a
rotated rectangle becomes its upright hull and every box is ordered and clamped.
The model's reasoning for a predicted box is the per-region ``textarea`` item
with the same region ``id`` (written by :mod:`egm.labelstudio.results`); a ``textarea``
without geometry holds text for the whole task (a typed prompt, or reasoning of
a prediction written without per-region text).

Bad items are skipped with a note, never raised: one odd region must not sink an export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from egm.geometry import Box, percent_from_value, percent_to_grid

RECT_TYPE = "rectanglelabels"
TEXT_TYPE = "textarea"


@dataclass(frozen=True)
class Region:
    """One box of a prediction or an annotation."""

    id: str
    label: str
    #: on the 0..1000 grid of the upright image.
    grid: Box
    #: upright image size Label Studio recorded with the region (as the browser showed it).
    original_width: int | None = None
    original_height: int | None = None
    #: per-region text (the model's reasoning in predictions), "" when none.
    text: str = ""


@dataclass
class ParsedResult:
    regions: list[Region] = field(default_factory=list)
    #: textarea texts without a region, by ``from_name``.
    texts: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def text_of(self, from_name: str | None) -> list[str]:
        if from_name is None:
            return [t for texts in self.texts.values() for t in texts]
        return list(self.texts.get(from_name, []))


def parse_result(result: Any, *, from_name: str | None = None, reasoning_from_name: str | None = None) -> ParsedResult:
    """Read a Label Studio result list.

    ``from_name`` keeps only rectangles of that control (``None``: any); per-region texts
    come from ``reasoning_from_name`` (``None``: any per-region textarea).
    """
    out = ParsedResult()
    if not isinstance(result, list):
        out.notes.append(f"result is not a list ({type(result).__name__})")
        return out
    region_texts: dict[str, list[str]] = {}
    rects: list[dict] = []
    for item in result:
        if not isinstance(item, dict):
            out.notes.append("result item is not an object")
            continue
        kind = str(item.get("type") or "").lower()
        if kind == RECT_TYPE and (from_name is None or item.get("from_name") == from_name):
            rects.append(item)
        elif kind == TEXT_TYPE:
            _collect_text(item, reasoning_from_name, region_texts, out)
    for item in rects:
        region = _region(item, region_texts, out.notes)
        if region is not None:
            out.regions.append(region)
    return out


def _collect_text(item: dict, reasoning_from_name: str | None, region_texts: dict[str, list[str]],
                  out: ParsedResult) -> None:
    texts = _texts(item.get("value"))
    if not texts:
        return
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    name = str(item.get("from_name") or "")
    has_geometry = "x" in value and "width" in value
    if has_geometry and item.get("id") is not None:
        if reasoning_from_name is None or name == reasoning_from_name:
            region_texts.setdefault(str(item["id"]), []).extend(texts)
        return
    out.texts.setdefault(name, []).extend(texts)


def _texts(value: Any) -> list[str]:
    texts = value.get("text") if isinstance(value, dict) else value
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        return []
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def _region(item: dict, region_texts: dict[str, list[str]], notes: list[str]) -> Region | None:
    rid = str(item.get("id") or "")
    value = item.get("value")
    if not isinstance(value, dict):
        notes.append(f"region {rid or '?'} has no value")
        return None
    labels = value.get("rectanglelabels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        notes.append(f"region {rid or '?'} has no label")
        return None
    try:
        grid = percent_to_grid(percent_from_value(value))
    except (KeyError, TypeError, ValueError) as exc:
        notes.append(f"region {rid or '?'} has bad geometry ({type(exc).__name__})")
        return None
    if not grid.is_finite():
        notes.append(f"region {rid or '?'} has non-finite geometry")
        return None
    return Region(id=rid, label=labels[0], grid=grid, original_width=_size(item.get("original_width")),
                  original_height=_size(item.get("original_height")),
                  text="\n".join(_unique(region_texts.get(rid, []))))


def _size(value: Any) -> int | None:
    try:
        size = int(round(float(value)))
    except (TypeError, ValueError):
        return None
    return size if size > 0 else None


def _unique(items: list[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
