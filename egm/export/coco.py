"""COCO detection JSON for classic detectors, from the same accepted annotations.

``coco/train.json`` and ``coco/val.json`` (same split as SFT/GRPO). ``file_name`` is
relative to the export folder; ``width``/``height`` are the upright size of the image
written there. Boxes are ``[x, y, w, h]`` in pixels of that image, converted through
:mod:`egm.geometry` (grid -> pixels). Categories are the labeling config's labels in
config order (ids from 1). Tasks whose accepted annotation has no box are kept as
images without objects (negatives).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from egm.export.images import ImageEntry
from egm.export.regions import Region
from egm.geometry import grid_to_pixels

COCO_FOLDER = "coco"


@dataclass
class CocoImage:
    task_id: int
    image: ImageEntry
    regions: list[Region]
    split: str


def categories(labels: list[str]) -> list[dict]:
    return [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(labels)]


def coco_document(items: list[CocoImage], labels: list[str]) -> dict:
    cats = categories(labels)
    cat_id = {c["name"]: c["id"] for c in cats}
    images, annotations = [], []
    for item in sorted(items, key=lambda i: i.task_id):
        images.append({"id": item.task_id, "file_name": item.image.rel_path,
                       "width": item.image.width, "height": item.image.height})
        for region in item.regions:
            if region.label not in cat_id:  # a label removed from the config since: keep it visible
                cat_id[region.label] = len(cats) + 1
                cats.append({"id": cat_id[region.label], "name": region.label, "supercategory": "object"})
            px = grid_to_pixels(region.grid, item.image.width, item.image.height)
            w, h = px.width, px.height
            annotations.append({"id": len(annotations) + 1, "image_id": item.task_id,
                                "category_id": cat_id[region.label],
                                "bbox": [round(px.x1, 2), round(px.y1, 2), round(w, 2), round(h, 2)],
                                "area": round(w * h, 2), "iscrowd": 0})
    return {"info": {"description": "egm-assist export of accepted Label Studio annotations"},
            "images": images, "annotations": annotations, "categories": cats}


def write_coco(items: list[CocoImage], labels: list[str], out_dir: Path) -> dict[str, int]:
    folder = Path(out_dir) / COCO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        doc = coco_document([i for i in items if i.split == split], labels)
        (folder / f"{split}.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
        counts[split] = len(doc["annotations"])
    return counts
