"""COCO detection JSON: the one writer behind ``prelabel``'s ``coco.json`` and the export's ``coco/``.

Callers describe images and their objects with :class:`CocoImage` / :class:`CocoObject`
(boxes already in pixels of the upright, EXIF-applied image: :mod:`egm.geometry` did the
conversion) and get one document layout:

* ``categories``: the labeling config's labels in config order (ids from 1,
  ``supercategory`` "object"); a label outside that list gets a category of its own
  after them rather than being dropped;
* ``images``: ``id``, ``file_name``, ``width``, ``height`` (upright pixels);
* ``annotations``: ``bbox`` ``[x, y, w, h]`` and ``area`` rounded to 0.01 px,
  ``iscrowd`` 0, and ``score`` when the object has one (pre-annotations do,
  accepted annotations do not);
* images without objects are kept (negatives).

Files are written whole and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from egm.geometry import Box


@dataclass(frozen=True)
class CocoObject:
    label: str
    #: pixels of the upright image.
    pixels: Box
    score: float | None = None


@dataclass
class CocoImage:
    id: int
    file_name: str | None
    width: int | None
    height: int | None
    objects: list[CocoObject] = field(default_factory=list)


def _category(cat_id: int, name: str) -> dict:
    return {"id": cat_id, "name": name, "supercategory": "object"}


def coco_document(images: list[CocoImage], labels: list[str], description: str) -> dict:
    """The COCO document for ``images``, categories from ``labels`` first (see module doc)."""
    cats = [_category(i + 1, name) for i, name in enumerate(labels)]
    cat_id = {c["name"]: c["id"] for c in cats}
    doc_images, annotations = [], []
    for image in images:
        doc_images.append({"id": image.id, "file_name": image.file_name, "width": image.width, "height": image.height})
        for obj in image.objects:
            if obj.label not in cat_id:
                cat_id[obj.label] = len(cats) + 1
                cats.append(_category(cat_id[obj.label], obj.label))
            px = obj.pixels
            annotation = {"id": len(annotations) + 1, "image_id": image.id, "category_id": cat_id[obj.label],
                          "bbox": [round(px.x1, 2), round(px.y1, 2), round(px.width, 2), round(px.height, 2)],
                          "area": round(px.area, 2), "iscrowd": 0}
            if obj.score is not None:
                annotation["score"] = obj.score
            annotations.append(annotation)
    return {"info": {"description": description}, "images": doc_images, "annotations": annotations,
            "categories": cats}


def write_coco(path: Path, images: list[CocoImage], labels: list[str], description: str) -> dict:
    """Write the document to ``path`` atomically; returns it."""
    doc = coco_document(images, labels, description)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return doc
