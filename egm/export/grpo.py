"""GRPO data for verl: parquet written with pyarrow, in EGM's schema (REFERENCE.md 1).

Columns::

    data_source   string                      "grounding"
    prompt        list<struct<role, content>> [{"role": "user", "content": "<image>\\nLocate X, output ..."}]
    images        list<string>                [image path relative to the export folder]
    ability       string                      "grounding"
    reward_model  struct<style: string, ground_truth: list<int64>>
    extra_info    struct<split, index, id, height, width, question>

The prompt is EGM's inference prompt (no final period). ``ground_truth`` is on the 0..1000
grid: ``[x1, y1, x2, y2]`` for one instance, exactly as EGM; a label with several instances
is the same flat list with 4 numbers per box, ``[x1, y1, x2, y2, x1', y1', ...]``, so every
row has one parquet type and single-box rows stay EGM's. ``reward.py`` (copied next to
the parquet files) reads both forms. ``single_only`` drops multi-instance rows.

Image paths are relative to the export folder: start verl there, or pass ``absolute_paths``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from egm.export.samples import Sample
from egm.prompts import PromptTemplates

GRPO_FOLDER = "grpo"
DATA_SOURCE = "grounding"
ABILITY = "grounding"
REWARD_FILE = Path(__file__).with_name("reward.py")

SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("images", pa.list_(pa.string())),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.int64()))])),
    ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("id", pa.string()),
                              ("height", pa.int64()), ("width", pa.int64()), ("question", pa.string())])),
])


def ground_truth(sample: Sample) -> list[int]:
    return [int(round(v)) for box in sample.boxes for v in box.to_list()]


def grpo_row(sample: Sample, index: int, templates: PromptTemplates, image_root: Path | None = None) -> dict:
    image = sample.image.rel_path
    if image_root is not None:
        image = str((image_root / image).resolve())
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": "<image>\n" + templates.referring_prompt(sample.query)}],
        "images": [image],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth(sample)},
        "extra_info": {"split": sample.split, "index": index, "id": sample.id, "height": sample.image.height,
                       "width": sample.image.width, "question": sample.query},
    }


def write_grpo(samples: list[Sample], out_dir: Path, templates: PromptTemplates, *, single_only: bool = False,
               absolute_paths: bool = False) -> dict[str, int]:
    """Write ``grpo/train.parquet``, ``grpo/val.parquet`` and ``grpo/reward.py``; rows per split."""
    out_dir = Path(out_dir)
    folder = out_dir / GRPO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split and (len(s.boxes) == 1 or not single_only)]
        rows = [grpo_row(s, i, templates, out_dir if absolute_paths else None) for i, s in enumerate(chosen)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, folder / f"{split}.parquet")
        counts[split] = len(rows)
    shutil.copyfile(REWARD_FILE, folder / "reward.py")
    return counts
