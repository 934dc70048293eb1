"""Correction figures kept current from Label Studio's annotation webhooks.

Each ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` event carries the full annotation
(REFERENCE.md 4); its boxes are matched against the prediction the annotator started
from (``parent_prediction``) exactly as the export does (:mod:`egm.export.corrections`),
and the result is added to the shared stats hash (:mod:`egm.stats`), which the backend's
``/metrics`` renders:

* ``egm_corrections_total{kind, label, model_version}``: boxes by what the human did;
* ``egm_correction_iou_sum{label, model_version}``: IoU summed over accepted, moved and
  relabeled boxes (mean IoU = this / their count);
* ``egm_correction_annotations_total{model_version}``: annotations measured.

These are *current* figures over the live annotations, not event counts: what one
annotation contributed is remembered (``<prefix>:corrections:annotation:<id>``), so an
update replaces it and ``ANNOTATIONS_DELETED`` (ids only) takes it back out. A cancelled
annotation, or one not started from a prediction, contributes nothing. Events older than
what was recorded (``updated_at``) and events for deleted annotations are ignored.

Label Studio's task payload has no prediction bodies; the prediction is taken from the
payload when present, else fetched by id through ``fetch_prediction`` (the backend passes
one that calls Label Studio, off the request thread).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import redis

from egm.keys import Keys
from egm.export.corrections import (DEFAULT_ACCEPT_TOLERANCE, DEFAULT_MATCH_IOU, MATCHED_KINDS, Correction,
                                    match_regions)
from egm.export.regions import parse_result
from egm.stats import StatsStore, field

log = logging.getLogger(__name__)

CORRECTIONS_METRIC = "egm_corrections_total"
IOU_METRIC = "egm_correction_iou_sum"
ANNOTATIONS_METRIC = "egm_correction_annotations_total"
LIVE_METRICS = (CORRECTIONS_METRIC, IOU_METRIC, ANNOTATIONS_METRIC)
TOMBSTONE_TTL_S = 30 * 24 * 3600

#: prediction id -> prediction dict (``result``, ``model_version``) or ``None``.
PredictionFetcher = Callable[[int], Any]


def _label_value(value: Any) -> str:
    # Field names are "name|k=v,k=v": keep the separators out of label values.
    text = str(value if value is not None else "")
    for ch in ",=|\n":
        text = text.replace(ch, "_")
    return text or "(none)"


def figures_for(corrections: list[Correction], model_version: str) -> dict[str, float]:
    """Stats-hash increments one measured annotation contributes."""
    version = _label_value(model_version)
    out: dict[str, float] = {field(ANNOTATIONS_METRIC, model_version=version): 1.0}
    for c in corrections:
        label = _label_value(c.label)
        key = field(CORRECTIONS_METRIC, kind=c.kind.value, label=label, model_version=version)
        out[key] = out.get(key, 0.0) + 1.0
        if c.kind.value in MATCHED_KINDS and c.iou is not None:
            key = field(IOU_METRIC, label=label, model_version=version)
            out[key] = out.get(key, 0.0) + float(c.iou)
    return out


class LiveCorrections:
    def __init__(self, connection: redis.Redis, prefix: str, *, fetch_prediction: PredictionFetcher | None = None,
                 accept_tolerance: float = DEFAULT_ACCEPT_TOLERANCE, match_iou: float = DEFAULT_MATCH_IOU) -> None:
        self.redis = connection
        self.prefix = prefix
        self.stats_key = StatsStore(connection, prefix).key
        self.fetch_prediction = fetch_prediction
        self.accept_tolerance = accept_tolerance
        self.match_iou = match_iou

    def record_key(self, annotation_id: int | str) -> str:
        return Keys(self.prefix).annotation_corrections(annotation_id)

    # ----------------------------------------------------------------- events

    def handle(self, event: dict) -> str:
        """Apply one webhook event; returns what was done (for logs and tests)."""
        action = str(event.get("action") or "")
        if action == "ANNOTATIONS_DELETED":
            ids = [a.get("id") for a in event.get("annotations") or [] if isinstance(a, dict)]
            for annotation_id in ids:
                if annotation_id is not None:
                    self._apply(annotation_id, None, None, deleted=True)
            return f"removed {len(ids)}"
        if action not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return "ignored: not an annotation event"
        annotation = event.get("annotation")
        if not isinstance(annotation, dict) or annotation.get("id") is None:
            return "ignored: no annotation in the event"
        figures, why = self._figures(annotation, event)
        self._apply(annotation["id"], figures, annotation.get("updated_at"))
        return why

    def _figures(self, annotation: dict, event: dict) -> tuple[dict[str, float], str]:
        if annotation.get("was_cancelled"):
            return {}, "cancelled: no figures"
        parent = annotation.get("parent_prediction")
        if parent is None:
            return {}, "not from a prediction: no figures"
        prediction = self._prediction(int(parent), event)
        if prediction is None:
            return {}, f"prediction {parent} unavailable: no figures"
        from_name, reasoning_name = _control_names(event)
        predicted = parse_result(prediction.get("result") or [], from_name=from_name,
                                 reasoning_from_name=reasoning_name).regions
        final = parse_result(annotation.get("result") or [], from_name=from_name,
                             reasoning_from_name=reasoning_name).regions
        corrections = match_regions(predicted, final, accept_tolerance=self.accept_tolerance,
                                    match_iou=self.match_iou)
        version = str(prediction.get("model_version") or "(none)")
        return figures_for(corrections, version), f"measured {len(corrections)} boxes"

    def _prediction(self, prediction_id: int, event: dict) -> dict | None:
        task = event.get("task") if isinstance(event.get("task"), dict) else {}
        for p in task.get("predictions") or []:
            if isinstance(p, dict) and p.get("id") == prediction_id and isinstance(p.get("result"), list):
                return p
        if self.fetch_prediction is None:
            return None
        try:
            found = self.fetch_prediction(prediction_id)
        except Exception as exc:  # noqa: BLE001 - Label Studio down must not break the webhook
            log.warning("cannot fetch prediction for correction figures",
                        extra={"prediction": prediction_id, "error": f"{type(exc).__name__}: {exc}"})
            return None
        if found is not None and not isinstance(found, dict):
            found = getattr(found, "raw", None) or {"result": getattr(found, "result", []),
                                                    "model_version": getattr(found, "model_version", "")}
        return found

    # ----------------------------------------------------------------- redis

    def _apply(self, annotation_id, figures: dict[str, float] | None, updated_at: str | None,
               deleted: bool = False) -> None:
        """Replace what this annotation contributed, atomically (WATCH on its record)."""
        key = self.record_key(annotation_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    old = json.loads(raw) if raw else {}
                    if old.get("deleted") or (not deleted and _older(updated_at, old.get("updated_at"))):
                        pipe.unwatch()
                        return
                    pipe.multi()
                    for name, amount in (old.get("fields") or {}).items():
                        pipe.hincrbyfloat(self.stats_key, name, -float(amount))
                    if deleted:
                        pipe.set(key, json.dumps({"deleted": True}), ex=TOMBSTONE_TTL_S)
                    else:
                        for name, amount in (figures or {}).items():
                            pipe.hincrbyfloat(self.stats_key, name, amount)
                        pipe.set(key, json.dumps({"updated_at": updated_at, "fields": figures or {}}))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue


def _older(new: str | None, old: str | None) -> bool:
    # ISO timestamps of one server compare correctly as strings.
    return bool(new and old and new < old)


def _control_names(event: dict) -> tuple[str | None, str | None]:
    """RectangleLabels and per-region TextArea names from the project's labeling config in the event."""
    project = event.get("project") if isinstance(event.get("project"), dict) else {}
    xml = project.get("label_config")
    if not xml:
        return None, None
    from egm.labelstudio.config import LabelingConfigError, parse_labeling_config

    try:
        target = parse_labeling_config(xml).target
    except LabelingConfigError:
        return None, None
    return target.from_name, target.reasoning_from_name


def record_webhook_event(stats: StatsStore, event: dict, fetch_prediction: PredictionFetcher | None = None,
                         prefix: str | None = None) -> str:
    """Convenience for one event with a stats store (prefix taken from its key)."""
    prefix = prefix or stats.prefix
    return LiveCorrections(stats.redis, prefix, fetch_prediction=fetch_prediction).handle(event)
