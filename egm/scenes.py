"""Synthetic shape scenes with known boxes, in the look of the bundled samples (``egm/samples``).

A scene is a vertical two-colour gradient with one to three flat shapes of different
kinds (``circle``, ``square`` - which may be a slightly oblong rectangle, as in the samples -
and an upright ``triangle``), never touching each other. Its boxes are exact: the pixel
extent of each drawn shape, converted to the 0..1000 grid with :mod:`egm.geometry`, so they
compare directly with EGM answers. The same seed always gives the same picture and boxes.

Used by the closed-loop benchmark (``bench/loop.py``: scenes -> pre-annotation -> corrected
annotations -> training -> a better model) and by tests that need pictures whose objects
are known. :func:`score` measures predicted boxes against the scenes' objects (the loop's
figures: share of objects found at IoU >= 0.5, mean IoU, precision).
"""

from __future__ import annotations

import colorsys
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from egm.geometry import Box, greedy_match, pixels_to_grid

LABELS = ("circle", "square", "triangle")
#: stored sizes (width, height): the samples' aspect ratios at about 76,800 pixels, enough for
#: a 50,176-pixel model budget without upscaling and small on disk (about 5 KB as JPEG).
SIZES = ((320, 240), (384, 216), (240, 320), (288, 288), (336, 224), (224, 336))
#: shape size as a share of the image's shorter side (the samples have 0.25-0.58).
MIN_SHARE, MAX_SHARE = 0.22, 0.5
#: gap in pixels between two shapes' boxes, and between a shape and the border.
GAP = 6
#: least colour distance (sum of channel differences) between a shape and the background under it.
MIN_CONTRAST = 120


@dataclass(frozen=True)
class SceneObject:
    label: str
    #: pixel box ``[x1, y1, x2, y2)`` of the drawn shape (x2/y2 exclusive).
    pixels: Box
    #: the same box on the 0..1000 grid of the image.
    grid: Box


@dataclass(frozen=True)
class Scene:
    seed: int
    width: int
    height: int
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"seed": self.seed, "width": self.width, "height": self.height,
                "objects": [{"label": o.label, "pixels": _rounded(o.pixels), "grid": _rounded(o.grid)}
                            for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        return cls(seed=int(d["seed"]), width=int(d["width"]), height=int(d["height"]),
                   objects=tuple(SceneObject(o["label"], Box(*o["pixels"]), Box(*o["grid"])) for o in d["objects"]))


def make_scene(seed: int, *, max_objects: int = 3) -> tuple[Image.Image, Scene]:
    """The picture and boxes of scene ``seed`` (1 to ``max_objects`` shapes of distinct kinds)."""
    rng = random.Random(f"egm-scene:{seed}")
    width, height = rng.choice(SIZES)
    top, bottom = _background_colours(rng)
    image = _gradient(width, height, top, bottom)
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, max(1, min(max_objects, len(LABELS))))
    placed: list[Box] = []
    objects = []
    for label in rng.sample(LABELS, count):
        box = _place(rng, label, width, height, placed)
        if box is None:
            continue
        colour = _shape_colour(rng, top, bottom, box, height)
        _draw(draw, label, box, colour)
        placed.append(box)
        objects.append(SceneObject(label, box, pixels_to_grid(box, width, height)))
    return image, Scene(seed, width, height, tuple(objects))


def write_scenes(folder: Path, seeds: range | list[int], *, quality: int = 90) -> list[Scene]:
    """Write ``scene-<seed>.jpg`` for each seed and ``scenes.jsonl`` (one Scene per line) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = []
    for seed in seeds:
        image, scene = make_scene(seed)
        image.save(folder / scene_file(seed), "JPEG", quality=quality)
        scenes.append(scene)
    with open(folder / "scenes.jsonl", "w", encoding="utf-8") as handle:
        for scene in scenes:
            handle.write(json.dumps(scene.to_json()) + "\n")
    return scenes


def read_scenes(folder: Path) -> list[Scene]:
    with open(Path(folder) / "scenes.jsonl", encoding="utf-8") as handle:
        return [Scene.from_json(json.loads(line)) for line in handle if line.strip()]


def scene_file(seed: int) -> str:
    return f"scene-{seed}.jpg"


#: the bundled sample images and their true boxes (``boxes.json``, measured from the pictures)
SAMPLES = Path(__file__).resolve().parent / "samples"


def sample_scenes() -> list[tuple[Path, Scene]]:
    """The bundled samples as scenes (``seed`` is the sample's index), with their image files."""
    table = json.loads((SAMPLES / "boxes.json").read_text(encoding="utf-8"))["images"]
    out = []
    for index, (name, item) in enumerate(sorted(table.items())):
        w, h = int(item["width"]), int(item["height"])
        objects = tuple(SceneObject(o["label"], Box(*o["pixels"]), pixels_to_grid(Box(*o["pixels"]), w, h))
                        for o in item["objects"])
        out.append((SAMPLES / name, Scene(index, w, h, objects)))
    return out


# --------------------------------------------------------------------------- scoring

#: IoU at which a predicted box counts as finding an object (EGM's and RefCOCO's accuracy threshold).
FOUND_IOU = 0.5


@dataclass
class Score:
    """Predicted boxes against scene objects, summed over scenes."""

    scenes: int = 0
    objects: int = 0
    #: objects paired with a predicted box of their label at IoU >= FOUND_IOU
    found: int = 0
    #: sum over objects of the IoU of the box paired with each (0 when none)
    iou_sum: float = 0.0
    predicted: int = 0
    #: per label: [objects, found]
    by_label: dict[str, list[int]] | None = None

    @property
    def found_share(self) -> float:
        return self.found / self.objects if self.objects else 0.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.objects if self.objects else 0.0

    @property
    def precision(self) -> float:
        return self.found / self.predicted if self.predicted else 0.0

    def to_json(self) -> dict:
        return {"scenes": self.scenes, "objects": self.objects, "found": self.found,
                "found_share": round(self.found_share, 4), "mean_iou": round(self.mean_iou, 4),
                "predicted_boxes": self.predicted, "precision": round(self.precision, 4),
                "by_label": {k: {"objects": v[0], "found": v[1]} for k, v in sorted((self.by_label or {}).items())}}


def score(pairs) -> Score:
    """Score ``(scene, [(label, grid Box), ...])`` pairs.

    Per scene and label, objects and predicted boxes are paired greedily by IoU (each box used
    once, :func:`egm.geometry.greedy_match`): an object is found when its pair has IoU >=
    :data:`FOUND_IOU`; its IoU is that of its pair, 0 without one. A box with another label
    never finds an object; precision is found objects over predicted boxes.
    """
    total = Score(by_label={})
    for scene, predictions in pairs:
        total.scenes += 1
        total.predicted += len(predictions)
        for label in {o.label for o in scene.objects} | {p[0] for p in predictions if p[0] is not None}:
            truth = [o.grid for o in scene.objects if o.label == label]
            boxes = [box for name, box in predictions if name == label]
            matched = greedy_match(truth, boxes)
            hits = sum(iou >= FOUND_IOU for _, _, iou in matched)
            total.objects += len(truth)
            total.found += hits
            total.iou_sum += sum(iou for _, _, iou in matched)
            if truth:
                counts = total.by_label.setdefault(label, [0, 0])
                counts[0] += len(truth)
                counts[1] += hits
    return total


# --------------------------------------------------------------------------- drawing

def _place(rng: random.Random, label: str, width: int, height: int, placed: list[Box]) -> Box | None:
    short = min(width, height)
    for _ in range(200):
        h = rng.uniform(MIN_SHARE, MAX_SHARE) * short
        aspect = {"circle": 1.0, "square": rng.uniform(0.75, 1.35), "triangle": rng.uniform(0.9, 1.3)}[label]
        w = min(h * aspect, width - 2 * GAP)
        x1 = rng.randint(GAP, int(width - w - GAP))
        y1 = rng.randint(GAP, int(height - h - GAP))
        box = Box(x1, y1, x1 + round(w), y1 + round(h))
        if all(_apart(box, other) for other in placed):
            return box
    return None


def _apart(a: Box, b: Box) -> bool:
    return a.x2 + GAP <= b.x1 or b.x2 + GAP <= a.x1 or a.y2 + GAP <= b.y1 or b.y2 + GAP <= a.y1


def _draw(draw: ImageDraw.ImageDraw, label: str, box: Box, colour: tuple[int, int, int]) -> None:
    # PIL's shape coordinates are inclusive: the last covered pixel is x2 - 1.
    x1, y1, x2, y2 = box.x1, box.y1, box.x2 - 1, box.y2 - 1
    if label == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=colour)
    elif label == "square":
        draw.rectangle((x1, y1, x2, y2), fill=colour)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)


def _background_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    top = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.75, 1.0))
    bottom = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.35, 0.8))
    return top, bottom


def _shape_colour(rng: random.Random, top, bottom, box: Box, height: int) -> tuple[int, int, int]:
    behind = [_mix(top, bottom, y / max(1, height - 1)) for y in (box.y1, (box.y1 + box.y2) / 2, box.y2)]
    colour = _hsv(rng.random(), rng.uniform(0.6, 0.9), rng.uniform(0.6, 0.95))
    for _ in range(50):
        if min(sum(abs(a - b) for a, b in zip(colour, bg)) for bg in behind) >= MIN_CONTRAST:
            break
        colour = _hsv(rng.random(), rng.uniform(0.6, 0.95), rng.uniform(0.45, 0.95))
    return colour


def _gradient(width: int, height: int, top, bottom) -> Image.Image:
    column = Image.new("RGB", (1, height))
    column.putdata([_mix(top, bottom, y / max(1, height - 1)) for y in range(height)])
    return column.resize((width, height), Image.NEAREST)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _rounded(box: Box) -> list[float]:
    return [round(v, 2) for v in box.to_list()]
