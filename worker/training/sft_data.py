"""The SFT export read as Qwen's qwen-vl-finetune reads it, encoded once for a trainer.

qwen-vl-finetune (QwenLM/Qwen3-VL, ``qwenvl/data/data_processor.py``) turns each JSONL row
into chat messages: the human turn is split at ``<image>`` into the image (its path joined
to the data folder) and the stripped text around it; the gpt turn becomes the assistant's
text. The processor's chat template tokenizes the conversation, and only the answer is
trained on: the tokens after ``<|im_start|>assistant\\n`` up to and including ``<|im_end|>``
and the newline after it. This module does the same, with two shortcuts that do not change
a single token or pixel (``tests/test_loop_training.py`` checks it against
``processor.apply_chat_template(..., tokenize=True)``):

* each image is preprocessed once, however many rows ask about it, and the image
  placeholder is expanded to the image's token count as the processor does;
* the 3-D rope positions are computed once per row instead of at every step.

:func:`multi_category_rows` adds, per image, one row that asks for every label with the
project's multi-category prompt (``EGM_PROMPT_MODE=multi``, the default pre-annotation
prompt) and answers with the boxes of that image's per-label rows. The export writes EGM's
per-label rows only; without these rows a model fine-tuned on it answers the default
prompt no better than before.

:func:`augment_rows` adds, per row, the same question about the picture mirrored left-right
(boxes mirrored with it) and with its colour channels rotated (boxes unchanged): a model
trained from scratch on a few thousand pictures otherwise learns them by heart (its loss
goes to zero while held-out pictures stay unsolved; docs/loop.md). Only rows that a variant
keeps true get one: answers without reasoning (which can say "left" or "red") to questions
that name nothing but a label (a typed expression can name a side or a colour).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from egm.geometry import mirror_grid
from egm.images.decode import to_rgb
from egm.parsing import format_completion, parse_completion

IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"
IGNORE_INDEX = -100


class SftDataError(ValueError):
    """A row of the SFT JSONL that cannot be trained on (named by file and line)."""


@dataclass(frozen=True)
class SftRow:
    id: str
    #: absolute path of the image
    image: Path
    #: the human turn split at ``<image>``: text before and after the image, each stripped
    before: str
    after: str
    answer: str
    #: how the picture is altered before encoding: a key of :data:`VARIANTS`, "" for as it is
    variant: str = ""

    def messages(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if self.before:
            content.append({"type": "text", "text": self.before})
        content.append({"type": "image", "image": str(self.image)})
        if self.after:
            content.append({"type": "text", "text": self.after})
        return [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": self.answer}]}]


def read_sft_jsonl(path: Path, data_path: Path) -> list[SftRow]:
    """Rows of ``path``; image paths are relative to ``data_path`` (qwen-vl-finetune's ``data_path``)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if line.strip():
                rows.append(_row(json.loads(line), Path(data_path), f"{path}:{lineno}"))
    return rows


def _row(item: Any, data_path: Path, where: str) -> SftRow:
    if not isinstance(item, dict):
        raise SftDataError(f"{where}: a row must be a JSON object")
    image, turns = item.get("image"), item.get("conversations")
    if not isinstance(image, str) or not image:
        raise SftDataError(f"{where}: 'image' must be one path (got {image!r})")
    if (not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns)
            or [t.get("from") for t in turns] != ["human", "gpt"]):
        raise SftDataError(f"{where}: 'conversations' must be one human turn and one gpt turn")
    question, answer = turns[0].get("value"), turns[1].get("value")
    if not isinstance(question, str) or question.count(IMAGE_PLACEHOLDER) != 1 or not isinstance(answer, str):
        raise SftDataError(f"{where}: the human turn must hold exactly one {IMAGE_PLACEHOLDER}")
    before, after = question.split(IMAGE_PLACEHOLDER)
    full = (data_path / image).resolve()
    if not full.is_file():
        raise SftDataError(f"{where}: image {full} does not exist")
    return SftRow(id=str(item.get("id", where)), image=full, before=before.strip(), after=after.strip(),
                  answer=answer)


def multi_category_rows(rows: list[SftRow], categories: list[str], multi_prompt: str) -> list[SftRow]:
    """One row per image asking for all ``categories`` at once (see the module docstring).

    An image's per-label rows are those whose answer labels are categories; their boxes are
    listed in the order of ``categories`` (then in their rows' order), with an empty reasoning.
    Images with a row about anything else (a typed expression) get no multi-category row:
    their per-label rows may not hold every labelled object.
    """
    by_image: OrderedDict[tuple[Path, str], list[SftRow]] = OrderedDict()
    for row in rows:
        by_image.setdefault((row.image, row.variant), []).append(row)
    out = []
    for (image, variant), image_rows in by_image.items():
        boxes: list[tuple[int, list[float], str]] = []
        for row in image_rows:
            parsed = parse_completion(row.answer)
            if not parsed.boxes or any(b.label not in categories for b in parsed.boxes):
                boxes = []
                break
            boxes += [(categories.index(b.label), b.box.to_list(), b.label) for b in parsed.boxes]
        if not boxes:
            continue
        boxes.sort(key=lambda item: item[0])
        answer = format_completion("", [(coords, label) for _, coords, label in boxes])
        out.append(SftRow(id=f"{image_rows[0].id}-multi", image=image, before="", after=multi_prompt,
                          answer=answer, variant=variant))
    return out


# --------------------------------------------------------------------------- augmentation

def _mirror(image):
    from PIL import ImageOps

    return ImageOps.mirror(image)


def _channels(order: tuple[int, int, int]):
    def apply(image):
        from PIL import Image

        bands = image.split()
        return Image.merge("RGB", [bands[i] for i in order])
    return apply


#: picture variants: name -> (what is done to the RGB picture, whether boxes are mirrored with it)
VARIANTS = {
    "mirror": (_mirror, True),
    "gbr": (_channels((1, 2, 0)), False),
    "brg": (_channels((2, 0, 1)), False),
}
#: what ``--augment`` names -> the variants it adds
AUGMENTATIONS = {"mirror": ("mirror",), "channels": ("gbr", "brg")}


def augmentation_kinds(spec: str) -> tuple[str, ...]:
    """``--augment``'s value ("mirror,channels", "mirror", "none", "") -> the kinds it names."""
    return tuple(k.strip() for k in spec.split(",") if k.strip() and k.strip() != "none")


def plain_questions(templates: Any, labels: list[str]) -> set[str]:
    """The questions that name nothing but labels: each label's referring prompt, the multi-category prompt."""
    return {templates.referring_prompt(label) for label in labels} | {templates.multi_prompt(labels)}


def augment_rows(rows: list[SftRow], kinds: tuple[str, ...], plain_questions: set[str]) -> list[SftRow]:
    """``rows`` plus their variants of ``kinds`` (keys of :data:`AUGMENTATIONS`; see the module docstring).

    ``plain_questions``: the questions that name nothing but labels (the referring prompt of each
    label, the multi-category prompt); rows asking anything else get no variant. Mirroring and
    a colour rotation combine (a mirrored picture also comes in its other colours).
    """
    unknown = [k for k in kinds if k not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}; choose from {sorted(AUGMENTATIONS)}")
    chains: list[tuple[str, ...]] = [()]
    for kind in kinds:
        chains += [chain + (v,) for chain in chains for v in AUGMENTATIONS[kind]]
    out = list(rows)
    for row in rows:
        parsed = parse_completion(row.answer)
        if row.variant or parsed.reasoning.strip() or not parsed.boxes or f"{row.before} {row.after}".strip() \
                not in plain_questions:
            continue
        for chain in chains[1:]:
            boxes = [(b.box, b.label) for b in parsed.boxes]
            if sum(VARIANTS[v][1] for v in chain) % 2:  # mirrored an odd number of times
                boxes = [(mirror_grid(box), label) for box, label in boxes]
            out.append(SftRow(id=f"{row.id}-{'-'.join(chain)}", image=row.image, before=row.before, after=row.after,
                              answer=format_completion("", [(box.to_list(), label) for box, label in boxes]),
                              variant="+".join(chain)))
    return out


def apply_variant(image, variant: str):
    """The RGB picture as ``variant`` (names joined by "+") alters it."""
    for name in filter(None, variant.split("+")):
        if name not in VARIANTS:
            raise SftDataError(f"unknown picture variant {name!r}")
        image = VARIANTS[name][0](image)
    return image


# --------------------------------------------------------------------------- encoding

@dataclass
class EncodedRow:
    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor
    #: (3, L) rope positions (temporal, height, width)
    position_ids: torch.Tensor
    #: index into :attr:`EncodedSft.pixel_values`
    image: int


class EncodedSft(torch.utils.data.Dataset):
    """Encoded rows plus each image's pixels; ``collate`` builds right-padded batches."""

    def __init__(self, rows: list[EncodedRow], pixel_values: list[torch.Tensor], grids: list[torch.Tensor],
                 pad_id: int) -> None:
        self.rows = rows
        self.pixel_values = pixel_values
        self.grids = grids
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return index

    def to(self, device: torch.device | str) -> EncodedSft:
        """Keep the pixels on ``device`` (the GPU holds thousands of small images easily)."""
        self.pixel_values = [p.to(device) for p in self.pixel_values]
        return self

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        n, width = len(rows), max(len(r.input_ids) for r in rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        mm = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((3, n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r.input_ids)
            input_ids[i, :k], labels[i, :k], attention[i, :k] = r.input_ids, r.labels, 1
            mm[i, :k], positions[:, i, :k] = r.mm_token_type_ids, r.position_ids
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "mm_token_type_ids": mm,
                "position_ids": positions,
                "pixel_values": torch.cat([self.pixel_values[r.image] for r in rows]),
                "image_grid_thw": torch.cat([self.grids[r.image] for r in rows])}

    def stats(self) -> dict[str, float]:
        lengths = [len(r.input_ids) for r in self.rows]
        trained = [int((r.labels != IGNORE_INDEX).sum()) for r in self.rows]
        return {"rows": len(self.rows), "images": len(self.pixel_values),
                "mean_tokens": round(sum(lengths) / max(1, len(lengths)), 1),
                "mean_answer_tokens": round(sum(trained) / max(1, len(trained)), 1)}


def encode_rows(rows: list[SftRow], processor: Any, model: Any, *, min_pixels: int, max_pixels: int) -> EncodedSft:
    """Tokenize every row and preprocess every image once (see the module docstring)."""
    from PIL import Image

    tokenizer = processor.tokenizer
    merge = int(processor.image_processor.merge_size) ** 2
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    images: dict[tuple[Path, str], int] = {}
    pixel_values: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    encoded = []
    for row in rows:
        key = (row.image, row.variant)
        if key not in images:
            with Image.open(row.image) as im:
                picture = apply_variant(to_rgb(im), row.variant)
            pixels = processor.image_processor(images=[picture], min_pixels=min_pixels,
                                               max_pixels=max_pixels, return_tensors="pt")
            images[key] = len(pixel_values)
            pixel_values.append(pixels["pixel_values"])
            grids.append(pixels["image_grid_thw"])
        index = images[key]
        grid = grids[index]
        text = processor.apply_chat_template(row.messages(), tokenize=False)
        if text.count(IMAGE_PAD) != 1:
            raise SftDataError(f"row {row.id}: the chat template wrote {text.count(IMAGE_PAD)} image placeholders")
        text = text.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merge))
        input_ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        mm = (input_ids == image_token).long()
        labels = answer_labels(input_ids, tokenizer)
        if not (labels != IGNORE_INDEX).any():
            raise SftDataError(f"row {row.id}: no assistant answer found to train on")
        positions, _ = model.model.get_rope_index(input_ids[None], mm[None], image_grid_thw=grid)
        encoded.append(EncodedRow(input_ids, labels, mm, positions[:, 0].cpu(), index))
    return EncodedSft(encoded, pixel_values, grids, pad_id=tokenizer.pad_token_id)


def answer_labels(input_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Labels that train on each assistant answer only (qwen-vl-finetune's masking)."""
    head = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = input_ids.tolist()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    pos = 0
    while pos <= len(ids) - len(head):
        if ids[pos:pos + len(head)] != head:
            pos += 1
            continue
        start = stop = pos + len(head)
        while stop < len(ids) and ids[stop] != end:
            stop += 1
        if stop == len(ids):
            break
        stop = min(len(ids), stop + 2)  # <|im_end|> and the newline after it
        labels[start:stop] = input_ids[start:stop]
        pos = stop
    return labels
