"""Where a run's tasks come from: a Label Studio project (or view / filter), a folder, a manifest.

Every source yields :class:`SourceTask` items in a stable order. A task that cannot
be sent to a worker (no image in its data, an unreadable manifest line) comes out
with ``problem`` set, so the run lists it as failed instead of dropping it silently.

Local images travel as paths *relative to the files root* (``EGM_LOCAL_FILES_ROOT`` of
the workers), so workers on other machines can mount the same dataset anywhere.
URLs (``http(s)://``, ``/data/...``) travel as they are.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from egm.queries import TaskDataError, image_of
from egm.bulk.run_store import task_key

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
#: manifest fields that may hold the image, in order of preference.
IMAGE_FIELDS = ("image", "image_url", "url", "path", "file_name", "filename", "file")
_URL_PREFIXES = ("http://", "https://", "data:", "/data/", "s3://", "gs://")


class SourceError(ValueError):
    """The source itself cannot be read (missing folder, unknown manifest format)."""


@dataclass
class SourceTask:
    task_id: int | None
    ref: str | None
    image: str
    #: already has a prediction of the run's model_version (Label Studio sources).
    predicted: bool = False
    #: why this task cannot be run (reported as a failed task).
    problem: str | None = None

    @property
    def key(self) -> str:
        return task_key(self.task_id, self.ref)


# --------------------------------------------------------------------------- Label Studio


def label_studio_tasks(client, project_id: int, image_key: str, model_version: str, *,
                       view_id: int | None = None, filters: dict | None = None,
                       page_size: int = 500) -> Iterator[SourceTask]:
    for record in client.iter_tasks(project_id, view_id=view_id, filters=filters, page_size=page_size):
        predicted = model_version in record.model_versions
        try:
            image = image_of(record.data, image_key)
        except TaskDataError as exc:
            yield SourceTask(task_id=record.id, ref=None, image="", predicted=predicted, problem=str(exc))
            continue
        yield SourceTask(task_id=record.id, ref=None, image=image, predicted=predicted)


# --------------------------------------------------------------------------- local


def is_url(value: str) -> bool:
    return value.lower().startswith(_URL_PREFIXES)


def relative_to_root(path: Path, root: Path) -> str | None:
    """``path`` as a POSIX path relative to ``root``; ``None`` when it lies outside."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        return None
    return Path(os.path.relpath(real, real_root)).as_posix()


def folder_tasks(folder: Path, root: Path, recursive: bool = True) -> Iterator[SourceTask]:
    if not folder.is_dir():
        raise SourceError(f"image folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    for path in files:
        yield _local_task(path, root)


def _local_task(path: Path, root: Path) -> SourceTask:
    rel = relative_to_root(path, root)
    if rel is None:
        return SourceTask(task_id=None, ref=str(path), image="",
                          problem=f"{path} is outside the files root {root} (EGM_LOCAL_FILES_ROOT)")
    return SourceTask(task_id=None, ref=rel, image=rel)


def manifest_tasks(manifest: Path, root: Path) -> Iterator[SourceTask]:
    """Images listed in a manifest: ``.txt`` (one per line), ``.jsonl``, ``.json`` (a list of
    strings, objects, or Label Studio tasks ``{"data": {...}}``) or ``.csv`` (an ``image`` column).
    Relative paths are relative to the manifest's folder."""
    if not manifest.is_file():
        raise SourceError(f"manifest not found: {manifest}")
    suffix = manifest.suffix.lower()
    readers = {".txt": _read_lines, ".lst": _read_lines, ".jsonl": _read_jsonl, ".ndjson": _read_jsonl,
               ".json": _read_json, ".csv": _read_csv}
    if suffix not in readers:
        raise SourceError(f"unknown manifest format {suffix!r}: use .txt, .jsonl, .json or .csv")
    seen: set[str] = set()
    for n, (entry, ref) in enumerate(readers[suffix](manifest), start=1):
        task = _manifest_task(entry, ref, manifest.parent, root, n)
        if task.key in seen:
            continue  # a repeated line is one task, not two
        seen.add(task.key)
        yield task


def _manifest_task(entry: Any, ref: str | None, base: Path, root: Path, n: int) -> SourceTask:
    image = _image_field(entry)
    if image is None:
        return SourceTask(task_id=None, ref=ref or f"line {n}", image="",
                          problem=f"manifest entry {n} has no image (fields tried: {', '.join(IMAGE_FIELDS)})")
    if is_url(image):
        return SourceTask(task_id=None, ref=ref or image, image=image)
    path = Path(image) if os.path.isabs(image) else base / image
    task = _local_task(path, root)
    if ref:
        task.ref = ref
    return task


def _image_field(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry.strip() or None
    if isinstance(entry, dict):
        data = entry.get("data") if isinstance(entry.get("data"), dict) else entry
        for name in IMAGE_FIELDS:
            value = data.get(name)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _entry_ref(entry: Any) -> str | None:
    if isinstance(entry, dict):
        for name in ("ref", "id", "key"):
            if entry.get(name) is not None and str(entry[name]).strip():
                return str(entry[name]).strip()
    return None


def _read_lines(path: Path) -> Iterator[tuple[Any, str | None]]:
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line, None


def _read_jsonl(path: Path) -> Iterator[tuple[Any, str | None]]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            yield {}, f"line {n}"
            continue
        yield entry, _entry_ref(entry)


def _read_json(path: Path) -> Iterator[tuple[Any, str | None]]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SourceError(f"manifest {path} is not valid JSON: {exc}") from None
    if isinstance(body, dict):
        body = body.get("tasks") or body.get("images") or []
    if not isinstance(body, list):
        raise SourceError(f"manifest {path} must hold a list of images")
    for entry in body:
        yield entry, _entry_ref(entry)


def _read_csv(path: Path) -> Iterator[tuple[Any, str | None]]:
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            yield row, _entry_ref(row)
