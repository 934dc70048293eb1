"""Which annotations count as accepted human truth.

Per task, Label Studio may hold several annotations (overlap, re-labeling, skips).
The one exported is chosen in this order:

1. cancelled ones (``was_cancelled``: the annotator skipped the task) never count;
2. where the Label Studio edition has reviews (Enterprise), only approved ones count:
   the latest review accepted it, or ``last_action`` says accepted. ``require_review``
   ``"auto"`` turns this on as soon as any annotation of the export carries review data;
3. a ground-truth-marked annotation wins; otherwise the newest (``updated_at``, then id).

Only then are the optional filters applied to the chosen annotation (from a prediction
of this backend: ``parent_prediction`` set; of a given ``model_version``), so an old
annotation never stands in for a newer one that the filters drop.

Every annotation gets a status, written to ``annotations.jsonl`` and counted in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Literal

from egm.labelstudio import ExportedAnnotation, ExportedTask, Prediction

ReviewPolicy = Literal["auto", "yes", "no"]
#: ``last_action`` values of Label Studio Enterprise reviews.
APPROVED_ACTIONS = frozenset({"accepted", "fixed_and_accepted"})
REJECTED_ACTIONS = frozenset({"rejected"})


class Status(str, Enum):
    accepted = "accepted"
    cancelled = "cancelled"
    superseded = "superseded"
    not_approved = "not_approved"
    no_prediction = "filtered_no_prediction"
    other_model_version = "filtered_model_version"


@dataclass(frozen=True)
class SelectionOptions:
    only_from_predictions: bool = False
    #: keep only annotations whose parent prediction has one of these model versions.
    model_versions: tuple[str, ...] = ()
    require_review: ReviewPolicy = "auto"


@dataclass
class Chosen:
    task: ExportedTask
    annotation: ExportedAnnotation
    #: the prediction the annotator started from, when Label Studio recorded one we can read.
    prediction: Prediction | None


@dataclass
class Decision:
    task_id: int
    annotation_id: int
    status: Status
    parent_prediction: int | None
    model_version: str | None


@dataclass
class Selection:
    chosen: list[Chosen] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    reviews_required: bool = False

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {s.value: 0 for s in Status}
        for d in self.decisions:
            out[d.status.value] += 1
        return out


def select_accepted(tasks: Iterable[ExportedTask], predictions: dict[int, Prediction],
                    options: SelectionOptions = SelectionOptions()) -> Selection:
    tasks = sorted(tasks, key=lambda t: t.id)
    reviews = _reviews_required(tasks, options.require_review)
    selection = Selection(reviews_required=reviews)
    for task in tasks:
        _select_task(task, predictions, options, reviews, selection)
    return selection


def _reviews_required(tasks: list[ExportedTask], policy: ReviewPolicy) -> bool:
    if policy != "auto":
        return policy == "yes"
    return any(_has_review_data(a) for t in tasks for a in t.annotations)


def _has_review_data(annotation: ExportedAnnotation) -> bool:
    action = str(annotation.raw.get("last_action") or "").lower()
    return bool(annotation.reviews) or action in APPROVED_ACTIONS | REJECTED_ACTIONS


def is_approved(annotation: ExportedAnnotation) -> bool:
    """Approved by review: the latest review accepted it (or ``last_action`` says so)."""
    if annotation.reviews:
        latest = max(annotation.reviews, key=lambda r: (str(r.get("created_at") or ""), _int(r.get("id"))))
        if "accepted" in latest:
            return bool(latest.get("accepted"))
        return str(latest.get("status") or latest.get("state") or "").lower() in ("accepted", "approved")
    return str(annotation.raw.get("last_action") or "").lower() in APPROVED_ACTIONS


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _newest_key(annotation: ExportedAnnotation) -> tuple:
    return (annotation.ground_truth, annotation.updated_at or annotation.created_at or "", annotation.id)


def _select_task(task: ExportedTask, predictions: dict[int, Prediction], options: SelectionOptions,
                 reviews: bool, selection: Selection) -> None:
    status: dict[int, Status] = {}
    candidates = []
    for a in task.annotations:
        if a.was_cancelled:
            status[a.id] = Status.cancelled
        elif reviews and not is_approved(a):
            status[a.id] = Status.not_approved
        else:
            candidates.append(a)
    if candidates:
        best = max(candidates, key=_newest_key)
        for a in candidates:
            status[a.id] = Status.superseded
        prediction = predictions.get(best.parent_prediction) if best.parent_prediction is not None else None
        status[best.id] = _filter(best, prediction, options)
        if status[best.id] is Status.accepted:
            selection.chosen.append(Chosen(task, best, prediction))
    for a in sorted(task.annotations, key=lambda a: a.id):
        p = predictions.get(a.parent_prediction) if a.parent_prediction is not None else None
        selection.decisions.append(Decision(task.id, a.id, status[a.id], a.parent_prediction,
                                            p.model_version if p else None))


def _filter(annotation: ExportedAnnotation, prediction: Prediction | None, options: SelectionOptions) -> Status:
    if (options.only_from_predictions or options.model_versions) and annotation.parent_prediction is None:
        return Status.no_prediction
    if options.model_versions and (prediction is None or prediction.model_version not in options.model_versions):
        return Status.other_model_version
    return Status.accepted
