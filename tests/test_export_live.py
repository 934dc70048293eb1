"""Correction figures from webhook events, with a real Redis (egm/export/live.py, backend/webhook.py)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from egm.backend.app import create_app
from egm.export.live import LiveCorrections
from egm.queue import QueueClient
from egm.stats import StatsStore, parse_field

MV = "egm-live-1"


def rect(rid, label, x, w=20.0):
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 100, "original_height": 100,
            "value": {"x": x, "y": 10.0, "width": w, "height": 20.0, "rotation": 0, "rectanglelabels": [label]}}


PREDICTION = {"id": 7, "model_version": MV, "result": [rect("a", "Person", 10), rect("b", "Car", 60)]}


def event(action="ANNOTATION_CREATED", ann_id=1, result=None, parent=7, updated="2024-01-01T00:00:01Z",
          predictions=(PREDICTION,), **extra):
    annotation = {"id": ann_id, "result": result if result is not None else [rect("a", "Person", 10)],
                  "parent_prediction": parent, "was_cancelled": False, "updated_at": updated, **extra}
    return {"action": action, "annotation": annotation, "task": {"id": 3, "predictions": list(predictions)}}


@pytest.fixture()
def live(egm_env):
    queue = QueueClient(egm_env)
    return LiveCorrections(queue.redis, egm_env.queue_prefix), StatsStore(queue.redis, egm_env.queue_prefix)


def figures(stats: StatsStore) -> dict:
    out = {}
    for raw, value in stats.snapshot().items():
        name, labels = parse_field(raw)
        if name == "egm_corrections_total" and value:
            out[(labels["kind"], labels["label"])] = value
    return out


def test_create_then_update_replaces_the_annotations_figures(live):
    lc, stats = live
    lc.handle(event())  # Person kept, Car deleted
    assert figures(stats) == {("accepted", "Person"): 1, ("deleted", "Car"): 1}
    lc.handle(event("ANNOTATION_UPDATED", result=[rect("a", "Person", 15), rect("b", "Car", 60)],
                    updated="2024-01-01T00:00:02Z"))
    assert figures(stats) == {("moved", "Person"): 1, ("accepted", "Car"): 1}
    iou = {parse_field(k)[1]["label"]: v for k, v in stats.snapshot().items()
           if k.startswith("egm_correction_iou_sum")}
    assert iou == pytest.approx({"Person": 15 / 25, "Car": 1.0})  # Person moved by a quarter of its width


def test_stale_and_repeated_events_do_not_double_count(live):
    lc, stats = live
    lc.handle(event(updated="2024-01-01T00:00:05Z"))
    lc.handle(event(updated="2024-01-01T00:00:05Z"))
    lc.handle(event("ANNOTATION_UPDATED", result=[], updated="2024-01-01T00:00:01Z"))  # older: ignored
    assert figures(stats) == {("accepted", "Person"): 1, ("deleted", "Car"): 1}


def test_deletion_takes_figures_out_for_good(live):
    lc, stats = live
    lc.handle(event(ann_id=1))
    lc.handle(event(ann_id=2, result=[rect("b", "Car", 60)]))
    assert lc.handle({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]}) == "removed 1"
    assert figures(stats) == {("deleted", "Person"): 1, ("accepted", "Car"): 1}
    lc.handle(event("ANNOTATION_UPDATED", ann_id=1, updated="2030-01-01T00:00:00Z"))  # late event of a deleted one
    assert figures(stats) == {("deleted", "Person"): 1, ("accepted", "Car"): 1}


def test_cancelled_scratch_and_unknown_predictions_give_nothing(live):
    lc, stats = live
    lc.handle(event(ann_id=1))
    assert lc.handle(event("ANNOTATION_UPDATED", ann_id=1, was_cancelled=True,
                           updated="2024-01-02T00:00:00Z")) == "cancelled: no figures"
    assert lc.handle(event(ann_id=2, parent=None)) == "not from a prediction: no figures"
    assert lc.handle(event(ann_id=3, parent=99)).startswith("prediction 99 unavailable")
    assert figures(stats) == {}
    assert lc.handle({"action": "ANNOTATION_CREATED"}) == "ignored: no annotation in the event"


def test_prediction_is_fetched_when_the_payload_has_none_and_failures_are_contained(egm_env):
    queue = QueueClient(egm_env)
    stats = StatsStore(queue.redis, egm_env.queue_prefix)
    asked = []

    def fetch(prediction_id):
        asked.append(prediction_id)
        if prediction_id == 8:
            raise ConnectionError("Label Studio is down")
        return PREDICTION

    lc = LiveCorrections(queue.redis, egm_env.queue_prefix, fetch_prediction=fetch)
    lc.handle(event(predictions=()))
    assert lc.handle(event(ann_id=2, parent=8, predictions=())).startswith("prediction 8 unavailable")
    assert asked == [7, 8] and figures(stats) == {("accepted", "Person"): 1, ("deleted", "Car"): 1}


def test_backend_webhook_route_feeds_metrics(egm_env):
    with TestClient(create_app(egm_env)) as client:
        created = client.post("/webhook", json=event(result=[rect("a", "Person", 12), rect("n", "Dog", 80, 5)]))
        assert created.status_code == 201
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and 'kind="moved"' not in text:
            text = client.get("/metrics").text
            time.sleep(0.05)
    assert "# TYPE egm_corrections_total gauge" in text
    assert f'egm_corrections_total{{kind="moved",label="Person",model_version="{MV}"}} 1.0' in text
    assert f'egm_corrections_total{{kind="added",label="Dog",model_version="{MV}"}} 1.0' in text
    assert f'egm_corrections_total{{kind="deleted",label="Car",model_version="{MV}"}} 1.0' in text
    assert 'egm_annotation_events_total{action="ANNOTATION_CREATED"} 1.0' in text
