"""Box geometry and every coordinate convention of the project, in one place.

Three coordinate spaces, all of the *upright* image (EXIF orientation applied):

* ``grid``    – Qwen3-VL's relative 0..1000 grid: ``pixel = v / 1000 * size``.
* ``pixels``  – pixels of the upright original image.
* ``percent`` – Label Studio's rectangle value: ``x, y, width, height`` in 0..100.

EXIF orientation maps the *stored* pixel array to the *upright* image a person
sees. Label Studio shows images upright (browsers apply EXIF), EGM sees the
image we hand it (we apply EXIF before inference), so boxes live in upright
space; ``stored_to_upright``/``upright_to_stored`` are only needed by code that
works on the raw pixel array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GRID = 1000.0

#: EXIF orientation tag values (1..8) -> (transpose, rotate_cw_degrees) describing
#: how to turn the stored array upright: optionally mirror horizontally, then rotate.
EXIF_ORIENTATIONS = range(1, 9)


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box ``(x1, y1, x2, y2)`` in some coordinate space."""

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_list(cls, values: list[float] | tuple[float, ...]) -> "Box":
        x1, y1, x2, y2 = (float(v) for v in values)
        return cls(x1, y1, x2, y2)

    def to_list(self, ndigits: int | None = None) -> list[float]:
        vals = [self.x1, self.y1, self.x2, self.y2]
        if ndigits is None:
            return vals
        return [round(v, ndigits) if ndigits else int(round(v)) for v in vals]

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def is_ordered(self) -> bool:
        return self.x1 <= self.x2 and self.y1 <= self.y2

    def ordered(self) -> "Box":
        """Swap corners so that x1 <= x2 and y1 <= y2."""
        return Box(min(self.x1, self.x2), min(self.y1, self.y2), max(self.x1, self.x2), max(self.y1, self.y2))

    def clip(self, width: float, height: float) -> "Box":
        """Clamp into ``[0, width] x [0, height]``."""
        return Box(
            _clamp(self.x1, 0.0, width), _clamp(self.y1, 0.0, height),
            _clamp(self.x2, 0.0, width), _clamp(self.y2, 0.0, height),
        )

    def iou(self, other: "Box") -> float:
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.x1, self.y1, self.x2, self.y2))


def _clamp(v: float, lo: float, hi: float) -> float:
    return lo if v < lo else hi if v > hi else v


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")


# --- grid <-> pixels ----------------------------------------------------------

def sanitize_grid(box: Box) -> Box:
    """Order corners and clamp to the 0..1000 grid (what EGM's own evaluation does)."""
    return box.ordered().clip(GRID, GRID)


def grid_to_pixels(box: Box, width: float, height: float, min_size: float = 1.0) -> Box:
    """0..1000 grid -> pixels of the upright image; ordered, inside the image, at least ``min_size`` wide/high."""
    _check_size(width, height)
    g = sanitize_grid(box)
    px = Box(g.x1 / GRID * width, g.y1 / GRID * height, g.x2 / GRID * width, g.y2 / GRID * height)
    return _ensure_min_size(px, width, height, min_size)


def pixels_to_grid(box: Box, width: float, height: float) -> Box:
    _check_size(width, height)
    b = box.ordered().clip(width, height)
    return Box(b.x1 / width * GRID, b.y1 / height * GRID, b.x2 / width * GRID, b.y2 / height * GRID)


def _ensure_min_size(box: Box, width: float, height: float, min_size: float) -> Box:
    """Grow a degenerate box to ``min_size`` while keeping it inside the image."""
    x1, y1, x2, y2 = box.x1, box.y1, box.x2, box.y2
    if x2 - x1 < min_size:
        x2 = min(width, x1 + min_size)
        x1 = max(0.0, x2 - min_size)
    if y2 - y1 < min_size:
        y2 = min(height, y1 + min_size)
        y1 = max(0.0, y2 - min_size)
    return Box(x1, y1, x2, y2)


# --- pixels / grid <-> Label Studio percent -----------------------------------

@dataclass(frozen=True, slots=True)
class PercentRect:
    """Label Studio's rectangle value: top-left corner and size in percent of the image."""

    x: float
    y: float
    width: float
    height: float

    def as_value(self) -> dict[str, float]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "rotation": 0}


def pixels_to_percent(box: Box, width: float, height: float) -> PercentRect:
    _check_size(width, height)
    b = box.ordered().clip(width, height)
    return PercentRect(b.x1 / width * 100.0, b.y1 / height * 100.0, b.width / width * 100.0, b.height / height * 100.0)


def percent_to_pixels(rect: PercentRect, width: float, height: float) -> Box:
    _check_size(width, height)
    box = Box(
        rect.x / 100.0 * width, rect.y / 100.0 * height,
        (rect.x + rect.width) / 100.0 * width, (rect.y + rect.height) / 100.0 * height,
    )
    return box.ordered().clip(width, height)


def grid_to_percent(box: Box) -> PercentRect:
    """0..1000 grid -> percent. Both are relative, so no image size is needed."""
    g = sanitize_grid(box)
    return PercentRect(g.x1 / 10.0, g.y1 / 10.0, g.width / 10.0, g.height / 10.0)


def percent_to_grid(rect: PercentRect) -> Box:
    return sanitize_grid(Box(rect.x * 10.0, rect.y * 10.0, (rect.x + rect.width) * 10.0, (rect.y + rect.height) * 10.0))


def percent_from_value(value: dict) -> PercentRect:
    """Read a Label Studio rectangle ``value``. Rotated rectangles are replaced by their upright bounding box."""
    rect = PercentRect(float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"]))
    rotation = float(value.get("rotation") or 0.0) % 360.0
    if rotation == 0.0:
        return rect
    # Label Studio rotates around the top-left corner, in percent space of each axis;
    # convert to the axis-aligned hull so exports stay valid boxes.
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    corners = [(0.0, 0.0), (rect.width, 0.0), (rect.width, rect.height), (0.0, rect.height)]
    xs = [rect.x + cx * cos - cy * sin for cx, cy in corners]
    ys = [rect.y + cx * sin + cy * cos for cx, cy in corners]
    x1, x2 = max(0.0, min(xs)), min(100.0, max(xs))
    y1, y2 = max(0.0, min(ys)), min(100.0, max(ys))
    return PercentRect(x1, y1, x2 - x1, y2 - y1)


# --- EXIF orientation -----------------------------------------------------------

def upright_size(stored_width: int, stored_height: int, orientation: int) -> tuple[int, int]:
    """Size of the image after its EXIF orientation is applied."""
    if orientation in (5, 6, 7, 8):
        return stored_height, stored_width
    return stored_width, stored_height


def _map_point_stored_to_upright(x: float, y: float, w: float, h: float, orientation: int) -> tuple[float, float]:
    # (x, y) is a continuous coordinate in the stored array of size w x h.
    if orientation == 1:
        return x, y
    if orientation == 2:  # mirrored horizontally
        return w - x, y
    if orientation == 3:  # rotated 180
        return w - x, h - y
    if orientation == 4:  # mirrored vertically
        return x, h - y
    if orientation == 5:  # transposed (mirror + 90 CCW)
        return y, x
    if orientation == 6:  # needs 90 CW to be upright
        return h - y, x
    if orientation == 7:  # transverse
        return h - y, w - x
    if orientation == 8:  # needs 90 CCW to be upright
        return y, w - x
    raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")


def _map_point_upright_to_stored(u: float, v: float, w: float, h: float, orientation: int) -> tuple[float, float]:
    if orientation == 1:
        return u, v
    if orientation == 2:
        return w - u, v
    if orientation == 3:
        return w - u, h - v
    if orientation == 4:
        return u, h - v
    if orientation == 5:
        return v, u
    if orientation == 6:
        return v, h - u
    if orientation == 7:
        return w - v, h - u
    if orientation == 8:
        return w - v, u
    raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")


def stored_to_upright(box: Box, stored_width: int, stored_height: int, orientation: int) -> Box:
    """Pixel box on the stored array -> pixel box on the upright image."""
    a = _map_point_stored_to_upright(box.x1, box.y1, stored_width, stored_height, orientation)
    b = _map_point_stored_to_upright(box.x2, box.y2, stored_width, stored_height, orientation)
    return Box(a[0], a[1], b[0], b[1]).ordered()


def upright_to_stored(box: Box, stored_width: int, stored_height: int, orientation: int) -> Box:
    """Pixel box on the upright image -> pixel box on the stored array."""
    a = _map_point_upright_to_stored(box.x1, box.y1, stored_width, stored_height, orientation)
    b = _map_point_upright_to_stored(box.x2, box.y2, stored_width, stored_height, orientation)
    return Box(a[0], a[1], b[0], b[1]).ordered()


def mirror_grid(box: Box) -> Box:
    """A 0..1000 grid box of an image -> the same object's box once the image is mirrored left-right."""
    return stored_to_upright(box, int(GRID), int(GRID), 2)


# --- matching -----------------------------------------------------------------

def greedy_match(a: list[Box], b: list[Box], min_iou: float = 0.0) -> list[tuple[int, int, float]]:
    """Pair boxes of ``a`` with boxes of ``b`` by descending IoU, each box used once.

    Returns ``(index_a, index_b, iou)`` for every pair with IoU > ``min_iou``.
    Used by the multi-box reward and by the correction report.
    """
    pairs = sorted(
        ((a_box.iou(b_box), i, j) for i, a_box in enumerate(a) for j, b_box in enumerate(b)),
        reverse=True,
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    out: list[tuple[int, int, float]] = []
    for iou, i, j in pairs:
        if iou <= min_iou or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        out.append((i, j, iou))
    return out
