"""SFT JSONL in Qwen's qwen-vl-finetune format, as EGM built its SFT set (REFERENCE.md 1).

One line per sample::

    {"id": "task12-ann40-person-1a2b3c", "image": "images/3f2a....jpg", "height": 640, "width": 480,
     "conversations": [
        {"from": "human", "value": "<image>\\nLocate Person, output its bbox coordinates using JSON format."},
        {"from": "gpt", "value": "<reasoning>\\n</think>\\n\\n```json\\n[\\n\\t{\\"bbox_2d\\": [..], \\"label\\": \\"Person\\"}\\n]\\n```"}]}

``image`` is relative to the export folder (qwen-vl-finetune's ``data_path``); ``height``
and ``width`` are the upright size. The prompt is the EGM referring prompt with a final
period (the SFT data had one, the evaluation prompt has not). Boxes are on the 0..1000
grid. An answer-only sample has an empty reasoning: ``"\\n</think>\\n\\n```json ..."``, which
after the chat template's ``<think>\\n`` is Qwen3's empty-thinking form.
"""

from __future__ import annotations

import json
from pathlib import Path

from egm.export.samples import Sample
from egm.parsing import format_completion
from egm.prompts import PromptTemplates

SFT_FOLDER = "sft"


def sft_prompt(templates: PromptTemplates, query: str) -> str:
    text = templates.referring_prompt(query).rstrip()
    return text if text.endswith(".") else text + "."


def answer_text(sample: Sample) -> str:
    return format_completion(sample.reasoning, [(b.to_list(), sample.query) for b in sample.boxes])


def sft_row(sample: Sample, templates: PromptTemplates) -> dict:
    return {
        "id": sample.id,
        "image": sample.image.rel_path,
        "height": sample.image.height,
        "width": sample.image.width,
        "conversations": [
            {"from": "human", "value": "<image>\n" + sft_prompt(templates, sample.query)},
            {"from": "gpt", "value": answer_text(sample)},
        ],
    }


def write_sft(samples: list[Sample], out_dir: Path, templates: PromptTemplates) -> dict[str, int]:
    """Write ``sft/train.jsonl`` and ``sft/val.jsonl``; returns rows per split."""
    folder = Path(out_dir) / SFT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        rows = [sft_row(s, templates) for s in samples if s.split == split]
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[split] = len(rows)
    return counts
