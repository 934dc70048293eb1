"""COCO detection JSON for classic detectors, from the same accepted annotations.

``coco/train.json`` and ``coco/val.json`` (same split as SFT/GRPO), written by the one
COCO writer, :mod:`egm.coco`. ``file_name`` is relative to the export folder;
``width``/``height`` are the upright size of the image written there. Boxes are
``[x, y, w, h]`` in pixels of that image, converted through :mod:`egm.geometry`
(grid -> pixels). Image ids are the Label Studio task ids. Tasks whose accepted
annotation has no box are kept as images without objects (negatives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from egm import coco
from egm.export.images import ImageEntry
from egm.export.regions import Region
from egm.geometry import grid_to_pixels

COCO_FOLDER = "coco"
DESCRIPTION = "egm-assist export of accepted Label Studio annotations"


@dataclass
class CocoImage:
    task_id: int
    image: ImageEntry
    regions: list[Region]
    split: str


def _coco_image(item: CocoImage) -> coco.CocoImage:
    width, height = item.image.width, item.image.height
    return coco.CocoImage(id=item.task_id, file_name=item.image.rel_path, width=width, height=height,
                          objects=[coco.CocoObject(r.label, grid_to_pixels(r.grid, width, height))
                                   for r in item.regions])


def coco_document(items: list[CocoImage], labels: list[str]) -> dict:
    return coco.coco_document([_coco_image(i) for i in sorted(items, key=lambda i: i.task_id)], labels, DESCRIPTION)


def write_coco(items: list[CocoImage], labels: list[str], out_dir: Path) -> dict[str, int]:
    counts = {}
    for split in ("train", "val"):
        chosen = sorted((i for i in items if i.split == split), key=lambda i: i.task_id)
        doc = coco.write_coco(Path(out_dir) / COCO_FOLDER / f"{split}.json", [_coco_image(i) for i in chosen],
                              labels, DESCRIPTION)
        counts[split] = len(doc["annotations"])
    return counts
