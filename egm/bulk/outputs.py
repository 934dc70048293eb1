"""Local runs' outputs: the durable results log and the files written from it.

``results.jsonl`` in the output folder holds one successful :class:`TaskResult` per
line, appended as batches finish; it is what a resumed run reads to know what is
done, so the outputs survive Redis result expiry and CLI crashes. From it:

* ``label_studio_import.json`` - Label Studio tasks with ``predictions`` (import it
  into a project whose labeling config uses the same control names);
* ``coco.json`` - COCO detection results (written by :mod:`egm.coco`, with scores), boxes
  ``[x, y, w, h]`` in pixels of the upright (EXIF-applied) image, which is what EGM's 0-1000
  grid refers to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from egm import coco
from egm.bulk.sources import is_url
from egm.coco import CocoImage, CocoObject
from egm.contract import LabelTarget, TaskResult
from egm.geometry import Box
from egm.bulk.run_store import task_key

RESULTS_FILE = "results.jsonl"
LS_IMPORT_FILE = "label_studio_import.json"
COCO_FILE = "coco.json"


class ResultLog:
    """Append-only log of successful task results, one JSON object per line."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RESULTS_FILE
        out_dir.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, TaskResult]:
        """Task key -> result (the last line of a task wins; a torn last line is ignored)."""
        out: dict[str, TaskResult] = {}
        if not self.path.exists():
            return out
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    result = TaskResult.model_validate_json(line)
                except ValueError:
                    continue  # a line cut short by a crash
                out[task_key(result.task_id, result.ref)] = result
        return out

    def append(self, results: Iterable[TaskResult]) -> int:
        lines = [r.model_dump_json() + "\n" for r in results if r.status == "ok"]
        if lines:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.writelines(lines)
                handle.flush()
                os.fsync(handle.fileno())
        return len(lines)


def _write_json(path: Path, body) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)  # readers never see a half-written file


def image_url(ref: str, prefix: str) -> str:
    """What goes into the Label Studio task's data: the prefix + relative path, URLs as they are."""
    return ref if is_url(ref) or not prefix else prefix + ref


def write_label_studio_import(path: Path, results: list[TaskResult], images: dict[str, str], target: LabelTarget,
                              model_version: str, prefix: str = "") -> int:
    tasks = []
    for r in results:
        ref = images.get(task_key(r.task_id, r.ref), r.ref or "")
        prediction = {"model_version": model_version, "score": r.score, "result": r.ls_result}
        tasks.append({"data": {target.image_key: image_url(ref, prefix), "egm_ref": r.ref},
                      "predictions": [prediction]})
    _write_json(path, tasks)
    return len(tasks)


def coco_images(results: list[TaskResult], images: dict[str, str]) -> list[CocoImage]:
    """One COCO image per result (ids from 1), its boxes in the upright pixels the worker computed."""
    return [CocoImage(id=n, file_name=images.get(task_key(r.task_id, r.ref), r.ref), width=r.width, height=r.height,
                      objects=[CocoObject(b.label, Box.from_list(b.pixels), b.score) for b in r.boxes])
            for n, r in enumerate(results, start=1)]


def write_coco(path: Path, results: list[TaskResult], images: dict[str, str], labels: list[str]) -> int:
    doc = coco.write_coco(path, coco_images(results, images), labels, "egm-assist pre-annotations")
    return len(doc["annotations"])
