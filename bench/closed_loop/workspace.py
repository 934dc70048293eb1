"""The loop's folder: where every stage reads and writes, and what travels to the GPU.

::

    .loop/                       (default; ignored by git)
      loop.json                  manifest: scenes, model size, image budget, labels, prompts  -> GPU
      state.json                 CPU side only: Label Studio credentials, project ids, stage results
      scenes/train, scenes/heldout   scene-<seed>.jpg + scenes.jsonl (true boxes)     heldout -> GPU
      models/v0                  the first pre-annotator (tiny, random weights taught EGM's format)
      models/v1, models/v1-grpo  unpacked from the GPU's output
      export/                    egm-assist export of the train project (sft/, grpo/, images/) -> GPU
      gpu-out/                   the GPU call's $OUT (v1.tar, v1-grpo.tar, loop-gpu.json, train.log)
      labelstudio/               Label Studio's database;  redis/, logs/
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / ".loop"
#: what the GPU call needs, relative to the repository root when the folder is the default one
GPU_PATHS = ("loop.json", "export", "scenes/heldout")


class Workspace:
    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root).resolve()
        self._state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ paths

    def scenes(self, split: str) -> Path:
        return self.root / "scenes" / split

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def labelstudio(self) -> Path:
        return self.root / "labelstudio"

    @property
    def gpu_out(self) -> Path:
        return self.root / "gpu-out"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def carry(self) -> list[str]:
        """The GPU call's carry list: paths relative to the repository root, where the loop's folder sits."""
        return [f"{self.root.name}/{p}" for p in GPU_PATHS]

    # ------------------------------------------------------------------ manifest (read on the GPU too)

    @property
    def manifest_path(self) -> Path:
        return self.root / "loop.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            raise SystemExit(f"error: {self.manifest_path} is missing: run `bench/loop.py prepare` first")
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        _write_json(self.manifest_path, manifest)

    # ------------------------------------------------------------------ state (CPU side)

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            path = self.root / "state.json"
            self._state = json.loads(path.read_text()) if path.is_file() else {}
        return self._state

    def save_state(self) -> None:
        _write_json(self.root / "state.json", self.state)


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a stage killed mid-write leaves the previous file, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
