"""What annotators did with predicted boxes: accepted, moved, relabeled, deleted, or added.

Each final box of an annotation is paired with the predicted box it came from:

1. by region id first: Label Studio keeps a prediction's region ids when an annotator
   starts from it, so an edited box keeps its id however far it was moved;
2. then, for boxes left over (a box deleted and redrawn), by IoU on the 0..1000 grid
   (:func:`egm.geometry.greedy_match`, pairs above ``match_iou``).

A pair is *accepted* when the label is the same and no corner moved more than
``accept_tolerance`` grid units (0.1 % of the image side each), *relabeled* when the
label changed (moved or not), else *moved* (with its IoU). Final boxes without a
pair were *added*, predicted boxes without one were *deleted*.

Figures are grouped by model_version and by label: the predicted box's label for
everything the model proposed (so "Person: 80 % accepted" speaks of the model's
Person boxes), the final label for added boxes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from egm.export.regions import Region
from egm.geometry import greedy_match

#: largest corner shift (grid units, 1 = 0.1 % of the side) still counted as "unchanged".
DEFAULT_ACCEPT_TOLERANCE = 1.0
#: IoU above which a left-over final box is taken as a redraw of a left-over predicted box.
DEFAULT_MATCH_IOU = 0.5


class Kind(str, Enum):
    accepted = "accepted"
    moved = "moved"
    relabeled = "relabeled"
    added = "added"
    deleted = "deleted"


KINDS = tuple(k.value for k in Kind)
#: kinds where a predicted and a final box exist (IoU is defined).
MATCHED_KINDS = (Kind.accepted.value, Kind.moved.value, Kind.relabeled.value)


@dataclass(frozen=True)
class Correction:
    kind: Kind
    predicted: Region | None
    final: Region | None
    iou: float | None = None

    @property
    def label(self) -> str:
        """Grouping label: the model's label when it proposed the box, else the human's."""
        region = self.predicted or self.final
        return region.label if region else ""


def match_regions(predicted: list[Region], final: list[Region], *,
                  accept_tolerance: float = DEFAULT_ACCEPT_TOLERANCE,
                  match_iou: float = DEFAULT_MATCH_IOU) -> list[Correction]:
    """Classify every predicted and every final box (each appears in exactly one correction)."""
    pairs: list[tuple[int, int]] = []
    pred_by_id: dict[str, int] = {}
    for i, region in enumerate(predicted):
        if region.id and region.id not in pred_by_id:
            pred_by_id[region.id] = i
    used_pred: set[int] = set()
    used_final: set[int] = set()
    for j, region in enumerate(final):
        i = pred_by_id.get(region.id) if region.id else None
        if i is not None and i not in used_pred:
            pairs.append((i, j))
            used_pred.add(i)
            used_final.add(j)
    rest_pred = [i for i in range(len(predicted)) if i not in used_pred]
    rest_final = [j for j in range(len(final)) if j not in used_final]
    for a, b, _ in greedy_match([predicted[i].grid for i in rest_pred], [final[j].grid for j in rest_final],
                                min_iou=match_iou):
        pairs.append((rest_pred[a], rest_final[b]))
        used_pred.add(rest_pred[a])
        used_final.add(rest_final[b])

    out = [_classify(predicted[i], final[j], accept_tolerance) for i, j in sorted(pairs, key=lambda p: p[1])]
    out += [Correction(Kind.added, None, final[j]) for j in range(len(final)) if j not in used_final]
    out += [Correction(Kind.deleted, predicted[i], None) for i in range(len(predicted)) if i not in used_pred]
    return out


def _classify(pred: Region, final: Region, tolerance: float) -> Correction:
    iou = pred.grid.iou(final.grid)
    if pred.label != final.label:
        return Correction(Kind.relabeled, pred, final, iou)
    shift = max(abs(a - b) for a, b in zip(pred.grid.to_list(), final.grid.to_list()))
    kind = Kind.accepted if shift <= tolerance else Kind.moved
    return Correction(kind, pred, final, iou)


# --------------------------------------------------------------------------- figures


@dataclass
class Figures:
    """Counts of one group (a model_version, a label, or everything)."""

    accepted: int = 0
    moved: int = 0
    relabeled: int = 0
    added: int = 0
    deleted: int = 0
    #: sum of IoU over accepted + moved + relabeled pairs.
    iou_sum: float = 0.0

    def add(self, kind: str, iou: float | None = None, count: int = 1) -> None:
        setattr(self, kind, getattr(self, kind) + count)
        if kind in MATCHED_KINDS and iou is not None:
            self.iou_sum += iou

    @property
    def predicted(self) -> int:
        return self.accepted + self.moved + self.relabeled + self.deleted

    @property
    def final(self) -> int:
        return self.accepted + self.moved + self.relabeled + self.added

    @property
    def matched(self) -> int:
        return self.accepted + self.moved + self.relabeled

    @property
    def acceptance_rate(self) -> float | None:
        """Share of predicted boxes kept unchanged."""
        return self.accepted / self.predicted if self.predicted else None

    @property
    def mean_iou(self) -> float | None:
        """Mean IoU between a predicted box and the final box it became."""
        return self.iou_sum / self.matched if self.matched else None

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in KINDS}
        out.update(predicted=self.predicted, final=self.final, matched=self.matched,
                   acceptance_rate=_round(self.acceptance_rate), mean_iou=_round(self.mean_iou),
                   iou_sum=round(self.iou_sum, 6))
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class Tally:
    """Figures overall, per model_version, per label, and per (model_version, label)."""

    overall: Figures = field(default_factory=Figures)
    by_model_version: dict[str, Figures] = field(default_factory=dict)
    by_label: dict[str, Figures] = field(default_factory=dict)
    by_version_label: dict[tuple[str, str], Figures] = field(default_factory=dict)

    def add(self, corrections: list[Correction], model_version: str) -> None:
        for c in corrections:
            for figures in (self.overall, self.by_model_version.setdefault(model_version, Figures()),
                            self.by_label.setdefault(c.label, Figures()),
                            self.by_version_label.setdefault((model_version, c.label), Figures())):
                figures.add(c.kind.value, c.iou)

    def as_dict(self) -> dict:
        versions = {}
        for version in sorted(self.by_model_version):
            labels = {label: f.as_dict() for (v, label), f in sorted(self.by_version_label.items()) if v == version}
            versions[version] = {**self.by_model_version[version].as_dict(), "by_label": labels}
        return {"overall": self.overall.as_dict(), "by_model_version": versions,
                "by_label": {label: f.as_dict() for label, f in sorted(self.by_label.items())}}


def correction_record(c: Correction, **context) -> dict:
    """One JSON line of ``corrections.jsonl``."""
    def region(r: Region | None) -> dict | None:
        if r is None:
            return None
        d = asdict(r)
        d["grid"] = [round(v, 3) for v in r.grid.to_list()]
        d.pop("text", None)
        return d

    return {**context, "kind": c.kind.value, "label": c.label,
            "iou": None if c.iou is None else round(c.iou, 6),
            "predicted": region(c.predicted), "final": region(c.final)}
