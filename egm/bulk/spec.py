"""What a bulk run is, and the ids that make re-runs and resumes idempotent.

The run id is derived from what the run *covers* (source, filters, model_version),
never from time or randomness: running the same command again lands on the same
run, sees what is already done or in flight, and enqueues only the rest. A batch's
job id is derived from the run and the tasks in it, so planning the same batch
twice yields the same RQ job id.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel

from egm.contract import LabelTarget, Query

_SLUG = re.compile(r"[^A-Za-z0-9]+")


class RunSpec(BaseModel):
    """Everything needed to plan, resume or retry a run; stored in Redis with the run."""

    run_id: str
    kind: Literal["label_studio", "local"]
    model_version: str
    target: LabelTarget
    queries: list[Query]
    batch_size: int
    # Label Studio runs
    project_id: int | None = None
    view_id: int | None = None
    filters: dict[str, Any] | None = None
    label_studio_url: str | None = None
    # local runs
    source_path: str | None = None
    source_kind: Literal["folder", "manifest"] | None = None
    #: folder the image paths are relative to (workers need EGM_LOCAL_FILES_ROOT pointing at it).
    files_root: str | None = None
    out_dir: str | None = None
    #: prefix put before each relative path in the Label Studio import file (e.g. /data/local-files/?d=imgs/).
    image_url_prefix: str = ""

    def for_version(self, model_version: str) -> "RunSpec":
        """The same run for another model_version (another run id: a run is one source at one version)."""
        if self.kind == "label_studio":
            run_id = label_studio_run_id(self.label_studio_url or "", self.project_id, self.view_id, self.filters,
                                         model_version)
        else:
            run_id = local_run_id(self.source_path or "", self.target.labels, model_version)
        return self.model_copy(update={"model_version": model_version, "run_id": run_id})

    @property
    def source(self) -> str:
        if self.kind == "label_studio":
            view = f" view {self.view_id}" if self.view_id is not None else ""
            return f"label-studio project {self.project_id}{view}"
        return f"{self.source_kind} {self.source_path}"


def _digest(material: dict[str, Any], n: int = 10) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:n]


def slug(text: str, limit: int = 24) -> str:
    return _SLUG.sub("-", text).strip("-")[:limit].strip("-").lower() or "run"


def label_studio_run_id(url: str, project_id: int, view_id: int | None, filters: dict | None,
                        model_version: str) -> str:
    material = {"url": url.rstrip("/"), "project": int(project_id), "view": view_id, "filters": filters,
                "model_version": model_version}
    return f"ls-p{int(project_id)}-{_digest(material)}"


def local_run_id(source_path: str, labels: list[str], model_version: str) -> str:
    material = {"source": source_path, "labels": labels, "model_version": model_version}
    name = source_path.rstrip("/").rsplit("/", 1)[-1]
    return f"local-{slug(name)}-{_digest(material)}"


def batch_job_id(run_id: str, task_keys: list[str]) -> str:
    """Same run and same tasks -> same job id (RQ ids allow letters, digits, '-' and '_')."""
    digest = hashlib.sha256("\0".join(task_keys).encode()).hexdigest()[:16]
    return f"{run_id}-{digest}"
