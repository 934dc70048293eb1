"""The one COCO writer (egm.coco): the files both callers write load as pycocotools loads them.

``check_coco`` repeats what ``pycocotools.coco.COCO`` (and ``loadRes`` for results with
scores) require of a file - the three lists, unique ids, every annotation on a known image
and category, a four-number ``bbox`` with ``area`` - plus what this project promises: boxes
inside the upright image, categories in the labeling config's order.
"""

from __future__ import annotations

import json

import pytest

from egm.bulk.outputs import write_coco as write_bulk_coco
from egm.contract import BoxResult, TaskResult
from egm.export.coco import CocoImage, write_coco as write_export_coco
from egm.export.images import ImageEntry
from egm.export.regions import Region
from egm.geometry import Box, grid_to_pixels

LABELS = ["Person", "Car"]


def check_coco(doc: dict, labels: list[str]) -> None:
    assert set(doc) >= {"images", "annotations", "categories"}
    images = {im["id"]: im for im in doc["images"]}
    assert len(images) == len(doc["images"]), "image ids must be unique"
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    assert len(cats) == len(doc["categories"]), "category ids must be unique"
    assert [cats[i + 1] for i in range(len(labels))] == labels, "categories start with the config's labels"
    ann_ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and all(i > 0 for i in ann_ids)  # pycocotools: ids from 1
    for ann in doc["annotations"]:
        image = images[ann["image_id"]]
        assert ann["category_id"] in cats
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["iscrowd"] == 0
        assert ann["area"] == pytest.approx(w * h, abs=0.05)
        assert x >= 0 and y >= 0 and x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01


def test_bulk_coco_loads_and_keeps_scores(tmp_path):
    def result(task_id, ref, w, h, *boxes):
        return TaskResult(task_id=task_id, ref=ref, status="ok", width=w, height=h, boxes=[
            BoxResult(label=label, grid=list(grid), pixels=grid_to_pixels(Box(*grid), w, h).to_list(), score=score)
            for label, grid, score in boxes])

    results = [result(None, "a.jpg", 800, 600, ("Car", (0, 500, 1000, 1000), 0.9), ("Ghost", (10, 10, 20, 20), 0.4)),
               result(None, "b.jpg", 480, 640)]
    path = tmp_path / "coco.json"
    assert write_bulk_coco(path, results, {}, LABELS) == 2
    doc = json.loads(path.read_text())
    check_coco(doc, LABELS)
    assert [im["file_name"] for im in doc["images"]] == ["a.jpg", "b.jpg"]
    car = doc["annotations"][0]
    assert car["bbox"] == [0.0, 300.0, 800.0, 300.0] and car["score"] == 0.9
    assert [c["name"] for c in doc["categories"]] == ["Person", "Car", "Ghost"]
    assert not list(tmp_path.glob("*.tmp"))


def test_export_coco_loads_per_split_without_scores(tmp_path):
    image = ImageEntry(source="/data/upload/1/a.jpg", rel_path="images/abc.jpg", width=800, height=600)
    items = [CocoImage(task_id=7, image=image, regions=[Region("a", "Person", Box(100, 100, 500, 900))], split="train"),
             CocoImage(task_id=3, image=image, regions=[Region("b", "Car", Box(0, 500, 1000, 1000))], split="train"),
             CocoImage(task_id=9, image=image, regions=[], split="val")]
    assert write_export_coco(items, LABELS, tmp_path) == {"train": 2, "val": 0}
    train = json.loads((tmp_path / "coco" / "train.json").read_text())
    check_coco(train, LABELS)
    assert [im["id"] for im in train["images"]] == [3, 7]  # task ids, in order
    assert all("score" not in a for a in train["annotations"])
    val = json.loads((tmp_path / "coco" / "val.json").read_text())
    check_coco(val, LABELS)
    assert val["images"][0]["id"] == 9 and val["annotations"] == []  # a negative stays


def test_both_callers_write_the_same_layout(tmp_path):
    """Same box, same image: the two files differ only in the description and the score."""
    image = ImageEntry(source="x", rel_path="images/abc.jpg", width=800, height=600)
    write_export_coco([CocoImage(task_id=1, image=image, regions=[Region("a", "Car", Box(0, 500, 1000, 1000))],
                                 split="train")], LABELS, tmp_path)
    exported = json.loads((tmp_path / "coco" / "train.json").read_text())
    pixels = grid_to_pixels(Box(0, 500, 1000, 1000), 800, 600).to_list()
    write_bulk_coco(tmp_path / "bulk.json", [TaskResult(status="ok", ref="images/abc.jpg", width=800, height=600, boxes=[
        BoxResult(label="Car", grid=[0, 500, 1000, 1000], pixels=pixels)])], {}, LABELS)
    bulk = json.loads((tmp_path / "bulk.json").read_text())
    assert {k: v for k, v in bulk.items() if k != "info"} == {k: v for k, v in exported.items() if k != "info"}
