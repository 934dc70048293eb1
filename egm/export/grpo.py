"""GRPO data for verl: parquet in EGM's schema, images in verl's multimodal form.

Columns (REFERENCE.md 1)::

    data_source   string                      "grounding" (one box) | "grounding_multi" (several)
    prompt        list<struct<role, content>> [{"role": "user", "content": "<image>\\nLocate X, output ..."}]
    images        list<struct<bytes>>         [{"bytes": <encoded image file>}]          (images="bytes")
                  list<struct<image>>         [{"image": "file:///abs/images/<h>.jpg"}]   (images="file")
    ability       string                      "grounding"
    reward_model  struct<style, ground_truth: list<int64>>
    extra_info    struct<split, index, id, height, width, question>

verl's ``RLHFDataset`` hands every ``images`` entry to ``qwen_vl_utils``: a dict with
``bytes`` (opened in memory) or ``image`` (a ``file://`` path) works in every verl release;
a bare path string is refused by verl 0.7-0.8 (``TypeError``, and with
``filter_overlong_prompts`` every row is silently dropped). ``bytes`` (the default) makes
the parquet self-contained, so it works wherever the Ray workers run; ``file`` keeps it
small but needs the export folder at the same absolute path on every node. ``file://`` is
followed by the plain absolute path (no percent-encoding): qwen_vl_utils strips the prefix
and opens the rest as is.

The prompt is EGM's inference prompt (no final period). ``ground_truth`` is on the 0..1000
grid: ``[x1, y1, x2, y2]`` for one instance, exactly EGM's row (``data_source`` grounding,
style ``rule``). A label with several instances is the same flat list with four numbers per
box under its own ``data_source`` ``grounding_multi`` and style ``rule_multi_box``, so EGM's
single-box reward, which scores such a row 0, is never applied to it by accident:
``reward.py`` (copied next to the parquet files) dispatches on ``data_source``, and verl's
built-in dispatch in EGM's fork raises on the unknown source instead of scoring it. (EGM's
``grounding.py`` given as verl's custom reward ignores ``data_source``; with it, export
with ``single_only``.) ``single_only`` drops the multi-instance rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from egm.export.reward import MULTI_SOURCE, MULTI_STYLE, SINGLE_SOURCE, SINGLE_STYLE
from egm.export.samples import Sample
from egm.prompts import PromptTemplates

GRPO_FOLDER = "grpo"
ABILITY = "grounding"
REWARD_FILE = Path(__file__).with_name("reward.py")

GrpoImages = Literal["bytes", "file"]
GRPO_IMAGE_MODES: tuple[GrpoImages, ...] = ("bytes", "file")
DEFAULT_GRPO_IMAGES: GrpoImages = "bytes"

_IMAGE_FIELD = {"bytes": pa.field("bytes", pa.binary()), "file": pa.field("image", pa.string())}


def schema(images: GrpoImages = DEFAULT_GRPO_IMAGES) -> pa.Schema:
    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([_IMAGE_FIELD[images]]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.int64()))])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64()), ("id", pa.string()),
                                  ("height", pa.int64()), ("width", pa.int64()), ("question", pa.string())])),
    ])


def ground_truth(sample: Sample) -> list[int]:
    return [int(round(v)) for box in sample.boxes for v in box.to_list()]


def image_entry(sample: Sample, out_dir: Path, images: GrpoImages) -> dict:
    """One ``images`` entry in verl's multimodal form, for the image the export wrote."""
    path = (Path(out_dir) / str(sample.image.rel_path)).resolve()
    if not path.is_file():  # verl would drop the row without a word; say it here
        raise FileNotFoundError(f"GRPO row {sample.id}: image {path} is missing "
                                "(the export writes images before the rows)")
    if images == "bytes":
        return {"bytes": path.read_bytes()}
    return {"image": "file://" + path.as_posix()}


def grpo_row(sample: Sample, index: int, templates: PromptTemplates, out_dir: Path,
             images: GrpoImages = DEFAULT_GRPO_IMAGES) -> dict:
    single = len(sample.boxes) == 1
    return {
        "data_source": SINGLE_SOURCE if single else MULTI_SOURCE,
        "prompt": [{"role": "user", "content": "<image>\n" + templates.referring_prompt(sample.query)}],
        "images": [image_entry(sample, out_dir, images)],
        "ability": ABILITY,
        "reward_model": {"style": SINGLE_STYLE if single else MULTI_STYLE, "ground_truth": ground_truth(sample)},
        "extra_info": {"split": sample.split, "index": index, "id": sample.id, "height": sample.image.height,
                       "width": sample.image.width, "question": sample.query},
    }


def write_grpo(samples: list[Sample], out_dir: Path, templates: PromptTemplates, *, single_only: bool = False,
               images: GrpoImages = DEFAULT_GRPO_IMAGES) -> dict[str, int]:
    """Write ``grpo/train.parquet``, ``grpo/val.parquet`` and ``grpo/reward.py``; rows per split.

    A split without rows gets no file (and loses one left by an earlier export): HF
    ``datasets``, which verl reads parquet with, fails on an empty parquet file.
    """
    if images not in GRPO_IMAGE_MODES:
        raise ValueError(f"GRPO images must be one of {', '.join(GRPO_IMAGE_MODES)}, not {images!r}")
    out_dir = Path(out_dir)
    folder = out_dir / GRPO_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        chosen = [s for s in samples if s.split == split and (len(s.boxes) == 1 or not single_only)]
        rows = [grpo_row(s, i, templates, out_dir, images) for i, s in enumerate(chosen)]
        path = folder / f"{split}.parquet"
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema(images)), path)
        else:  # HF datasets (verl's reader) cannot load an empty parquet file; none beats a broken one
            path.unlink(missing_ok=True)
        counts[split] = len(rows)
    shutil.copyfile(REWARD_FILE, folder / "reward.py")
    return counts
