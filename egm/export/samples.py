"""Accepted annotations -> training samples (one per referring expression or per label).

Grouping (the same for SFT and GRPO):

* **per label** (the default): one sample per (task, label) holding *all* of that
  label's final boxes, asked with the EGM referring prompt on the label name
  ("Locate Person, ...");
* **per referring expression**: when the annotation carries a typed prompt (the labeling
  config's prompt TextArea) and exactly one final box, that box is the answer to the typed
  expression, as in EGM's own data.

Tasks without any final box give no SFT/GRPO sample (EGM's data has no "nothing here"
answers); they still appear in COCO as images without objects.

Reasoning: a sample keeps the model's own reasoning when every one of its boxes was
accepted unchanged and no predicted box of that label was deleted, and then only the part
about its question (:func:`egm.reasoning.reasoning_for_label`: that label's block or
sentences; one multi-category text is never copied whole into every label's sample);
otherwise the human corrected the model and the sample needs a new rationale
(``needs_rationale``): the exporter either asks the workers for one or leaves the sample
answer-only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from egm.export.corrections import Correction, Kind
from egm.export.images import ImageEntry
from egm.export.regions import Region
from egm.geometry import Box
from egm.reasoning import in_label_blocks, reasoning_for_label


@dataclass
class Sample:
    task_id: int
    annotation_id: int
    #: what the prompt asks for: a label name or a typed referring expression.
    query: str
    label: str
    #: final boxes on the 0..1000 grid, in annotation order.
    boxes: list[Box]
    image: ImageEntry
    model_version: str | None
    from_expression: bool = False
    #: the model's reasoning, kept when the human accepted all boxes unchanged.
    model_reasoning: str = ""
    needs_rationale: bool = False
    #: filled by the exporter: reasoning used in the answer and where it came from.
    reasoning: str = ""
    reasoning_source: str = "none"  # model | rationale | none
    split: str = "train"
    kinds: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"task{self.task_id}-ann{self.annotation_id}-{slug(self.query)}"


@dataclass
class AnnotationView:
    """What the sample builder needs from one chosen annotation."""

    task_id: int
    annotation_id: int
    final: list[Region]
    corrections: list[Correction]
    image: ImageEntry
    model_version: str | None
    #: task-level reasoning of the parent prediction (textarea without a region), "" if none.
    prediction_reasoning: str = ""
    #: texts typed into the prompt TextArea of the annotation.
    expressions: list[str] = field(default_factory=list)


def build_samples(view: AnnotationView, labels: list[str]) -> list[Sample]:
    if not view.final:
        return []
    if len(view.expressions) == 1 and len(view.final) == 1:
        return [_sample(view, view.expressions[0], view.final[0].label, view.final, labels, True)]
    by_label: dict[str, list[Region]] = {}
    for region in view.final:
        by_label.setdefault(region.label, []).append(region)
    return [_sample(view, label, label, regions, labels, False) for label, regions in by_label.items()]


def _sample(view: AnnotationView, query: str, label: str, regions: list[Region], labels: list[str],
            from_expression: bool) -> Sample:
    ids = {id(r) for r in regions}
    mine = [c for c in view.corrections if c.final is not None and id(c.final) in ids]
    deleted_here = [c for c in view.corrections if c.kind is Kind.deleted and c.predicted is not None
                    and c.predicted.label == label]
    kept = bool(mine) and all(c.kind is Kind.accepted for c in mine) and not deleted_here
    reasoning = _model_reasoning(mine, view.prediction_reasoning, label, labels, from_expression) if kept else ""
    return Sample(task_id=view.task_id, annotation_id=view.annotation_id, query=query, label=label,
                  boxes=[r.grid for r in regions], image=view.image, model_version=view.model_version,
                  from_expression=from_expression, model_reasoning=reasoning,
                  needs_rationale=not reasoning, kinds=[c.kind.value for c in mine])


def _model_reasoning(corrections: list[Correction], task_text: str, label: str, labels: list[str],
                     from_expression: bool) -> str:
    """The model's reasoning about this sample's question only (egm.reasoning).

    A typed expression was asked on its own, so its reasoning is all about it, unless the box
    came from a per-label pre-annotation (then that label's block is the one that applies).
    """
    texts: list[str] = []
    for c in corrections:
        raw = c.predicted.text if c.predicted is not None and c.predicted.text else task_text
        if not raw:
            continue
        whole = from_expression and not in_label_blocks(raw, labels)
        text = raw.strip() if whole else reasoning_for_label(raw, label, labels)
        if text and text not in texts:
            texts.append(text)
    return "\n".join(texts)


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:limit].strip("-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
    return f"{s or 'q'}-{digest}"


def split_of(key: str, val_fraction: float, seed: str = "egm") -> str:
    """Deterministic train/val split: the same key (image) always lands in the same split."""
    if val_fraction <= 0:
        return "train"
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "val" if h < val_fraction else "train"
