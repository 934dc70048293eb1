"""Export and live correction figures against a real Label Studio.

The project is pre-annotated through the project's own path: the worker pipeline
(``BatchProcessor`` with the scripted engine giving every image the same two boxes)
and ``LabelStudioWriter`` writing the predictions. Then annotations are submitted
through Label Studio's API, each starting from its task's prediction:

=====  ==================  =====================================================
task   image               what the annotator did
=====  ==================  =====================================================
T1     shapes.jpg          an early draft (Person moved, Vehicle deleted), then a
                           newer annotation accepting both boxes unchanged
T2     wide.jpg            moved the Person box, relabeled Vehicle -> Animal
T3     rotated_exif6.jpg   kept Person, deleted Vehicle, added an Animal box
T4     tall.jpg            skipped the task (``was_cancelled``)
T5     generated 300x200   drew an Animal box from scratch (no prediction)
=====  ==================  =====================================================
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from egm.labelstudio.config import parse_labeling_config
from egm.backend.metrics import MetricsCollector
from egm.backend.models import WebhookEvent
from egm.backend.webhook import WebhookHandler
from egm.config.settings import reload_settings
from egm.cli.main import main as cli_main
from egm.contract import BatchJob, TaskJob
from egm.export.reward import compute_score
from egm.geometry import Box, grid_to_pixels
from egm.prompts import load_templates
from egm.queries import build_queries
from egm.queue import QueueClient
from tests.fixtures.labelstudio import StubMLBackend
from tests.images_factory import make_upright_jpeg
from egm import processes
from tests.stack import SAMPLES, spawn_worker
from egm.worker.delivery import LabelStudioWriter
from egm.worker.engines.scripted import ScriptedEngine
from egm.worker.batch_processor import BatchProcessor

CONFIG = (Path(__file__).resolve().parents[1] / "config" / "labeling" / "boxes_reasoning.xml").read_text()
MODEL_VERSION = "egm-export-test-1"
#: one multi-category answer about both labels: each label's sample keeps its own sentence
REASONING = "A person stands on the left. A vehicle is parked on the right."
ABOUT_PERSON, ABOUT_VEHICLE = "A person stands on the left.", "A vehicle is parked on the right."
PERSON, CAR = [100, 150, 400, 900], [550, 300, 950, 800]
TEMPLATE = (REASONING + "\n</think>\n\n```json\n[\n"
            "\t{{\"bbox_2d\": [100, 150, 400, 900], \"label\": \"person\"}},\n"
            "\t{{\"bbox_2d\": [550, 300, 950, 800], \"label\": \"car\"}}\n]\n```")


@pytest.fixture()
def settings(egm_env, label_studio, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("EGM_LOG_FORMAT", "text")
    return reload_settings()


# --------------------------------------------------------------------------- building the project


def _rects(result: list[dict]) -> dict[str, dict]:
    return {i["value"]["rectanglelabels"][0]: i for i in result if i["type"] == "rectanglelabels"}


def _texts(result: list[dict]) -> dict[str, dict]:
    return {i["id"]: i for i in result if i["type"] == "textarea"}


def _moved(item: dict, dx: float) -> dict:
    out = copy.deepcopy(item)
    out["value"]["x"] += dx
    return out


def _relabeled(item: dict, label: str) -> dict:
    out = copy.deepcopy(item)
    out["value"]["rectanglelabels"] = [label]
    return out


def _new_box(rid: str, label: str, x: float, y: float, w: float, h: float, like: dict | None = None,
             size: tuple[int, int] | None = None) -> dict:
    width, height = size or (like["original_width"], like["original_height"])
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def build_project(label_studio, settings, stub: StubMLBackend | None = None) -> dict:
    """Create, pre-annotate (real pipeline + writer) and annotate the project described above."""
    pid = label_studio.create_project(CONFIG)
    uploads = {}
    for name in ("shapes.jpg", "wide.jpg", "rotated_exif6.jpg", "tall.jpg"):
        uploads[name] = label_studio.upload_image(pid, SAMPLES / name)
    t5, _ = label_studio.upload_image(pid, make_upright_jpeg(300, 200, 1), "scratch.jpg")
    client = label_studio.client()

    target = parse_labeling_config(client.get_label_config(pid)).target
    queries = build_queries(target, load_templates(settings), "multi")
    predicted = ["shapes.jpg", "wide.jpg", "rotated_exif6.jpg", "tall.jpg"]
    job = BatchJob(project_id=pid, model_version=MODEL_VERSION, target=target, write_to_label_studio=True,
                   tasks=[TaskJob(task_id=uploads[n][0], image=uploads[n][1], queries=queries) for n in predicted])
    result = BatchProcessor(ScriptedEngine(template=TEMPLATE), settings, ls_client=client).process(job)
    assert [r.status for r in result.results] == ["ok"] * 4, [r.error for r in result.results]
    writer = LabelStudioWriter(client, QueueClient(settings).redis, settings.queue_prefix)
    assert len(writer.write(pid, result.results, MODEL_VERSION).written) == 4

    if stub is not None:  # after the predictions, so Label Studio never asks the stub for any
        label_studio.connect_ml_backend(pid, stub.url)

    preds = {p.task: p for p in client.list_predictions(project_id=pid)}
    t1, t2, t3, t4 = (uploads[n][0] for n in predicted)
    assert set(preds) == {t1, t2, t3, t4}
    ann = {}

    def submit(key, task, result, **extra):
        ann[key] = label_studio.create_annotation(task, result, **extra)["id"]

    p1 = preds[t1].result
    submit("t1_draft", t1, [_moved(_rects(p1)["Person"], 10.0)], parent_prediction=preds[t1].id)
    submit("t1", t1, copy.deepcopy(p1), parent_prediction=preds[t1].id)

    r2 = _rects(preds[t2].result)
    submit("t2", t2, [_moved(r2["Person"], 5.0), _relabeled(r2["Vehicle"], "Animal")],
           parent_prediction=preds[t2].id)

    p3 = preds[t3].result
    r3 = _rects(p3)
    person3 = r3["Person"]
    submit("t3", t3, [person3, _texts(p3)[person3["id"]], _new_box("added3", "Animal", 5, 5, 10, 10, like=person3)],
           parent_prediction=preds[t3].id)
    submit("t4", t4, [], was_cancelled=True)
    submit("t5", t5, [_new_box("scratch", "Animal", 10, 20, 30, 40, size=(300, 200))])
    return {"project": pid, "tasks": {"t1": t1, "t2": t2, "t3": t3, "t4": t4, "t5": t5}, "annotations": ann,
            "predictions": preds, "client": client}


def _export(settings, pid: int, out: Path, *extra: str) -> dict:
    code = cli_main(["export", "--project", str(pid), "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the export


def test_export_holds_exactly_the_accepted_corrections(label_studio, settings, tmp_path, capsys):
    built = build_project(label_studio, settings)
    pid, tasks, anns = built["project"], built["tasks"], built["annotations"]
    out = tmp_path / "export"
    report = _export(settings, pid, out, "--val-fraction", "0")
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks_exported"] == 4 and summary["samples"] == 7

    # -- selection statuses, one per annotation
    statuses = {row["annotation_id"]: row["status"] for row in _jsonl(out / "annotations.jsonl")}
    assert statuses == {anns["t1_draft"]: "superseded", anns["t1"]: "accepted", anns["t2"]: "accepted",
                        anns["t3"]: "accepted", anns["t4"]: "cancelled", anns["t5"]: "accepted"}
    assert report["annotations"]["by_status"]["accepted"] == 4
    assert report["annotations"]["measured"] == 3 and report["annotations"]["without_prediction"] == 1

    # -- every box with what the human did to it
    kinds = sorted((r["task_id"], r["kind"], r["label"]) for r in _jsonl(out / "corrections.jsonl"))
    assert kinds == sorted([
        (tasks["t1"], "accepted", "Person"), (tasks["t1"], "accepted", "Vehicle"),
        (tasks["t2"], "moved", "Person"), (tasks["t2"], "relabeled", "Vehicle"),
        (tasks["t3"], "accepted", "Person"), (tasks["t3"], "deleted", "Vehicle"), (tasks["t3"], "added", "Animal")])
    moved = next(r for r in _jsonl(out / "corrections.jsonl") if r["kind"] == "moved")
    assert moved["predicted"]["grid"] == PERSON and moved["final"]["grid"] == [150, 150, 450, 900]
    moved_iou = Box(*PERSON).iou(Box(150, 150, 450, 900))
    assert moved["iou"] == pytest.approx(moved_iou)

    # -- report figures
    overall = report["corrections"]["overall"]
    assert {k: overall[k] for k in ("accepted", "moved", "relabeled", "deleted", "added", "predicted")} == \
        {"accepted": 3, "moved": 1, "relabeled": 1, "deleted": 1, "added": 1, "predicted": 6}
    assert overall["acceptance_rate"] == 0.5
    assert overall["mean_iou"] == pytest.approx((4 + moved_iou) / 5, abs=1e-4)
    per_label = report["corrections"]["by_model_version"][MODEL_VERSION]["by_label"]
    assert (per_label["Person"]["accepted"], per_label["Person"]["moved"]) == (2, 1)
    assert (per_label["Vehicle"]["accepted"], per_label["Vehicle"]["relabeled"], per_label["Vehicle"]["deleted"]) \
        == (1, 1, 1)
    assert per_label["Animal"]["added"] == 1 and per_label["Animal"]["predicted"] == 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # -- SFT: one conversation per (task, label), model reasoning only where nothing was corrected
    rows = _jsonl(out / "sft" / "train.jsonl")
    assert _jsonl(out / "sft" / "val.jsonl") == []
    got = {}
    for row in rows:
        task_id = int(row["id"].split("-")[0].removeprefix("task"))
        human, gpt = row["conversations"]
        label = human["value"].split("Locate ", 1)[1].split(",", 1)[0]
        reasoning, _, answer = gpt["value"].partition("\n</think>\n\n")
        boxes = json.loads(answer.removeprefix("```json\n").removesuffix("\n```"))
        got[(task_id, label)] = (reasoning, [b["bbox_2d"] for b in boxes])
        assert all(b["label"] == label for b in boxes)
        assert human["value"].startswith("<image>\n") and human["value"].endswith("JSON format.")
        assert (out / row["image"]).is_file() and not row["image"].startswith("/")
    assert got == {
        (tasks["t1"], "Person"): (ABOUT_PERSON, [PERSON]),
        (tasks["t1"], "Vehicle"): (ABOUT_VEHICLE, [CAR]),
        (tasks["t2"], "Person"): ("", [[150, 150, 450, 900]]),
        (tasks["t2"], "Animal"): ("", [CAR]),
        (tasks["t3"], "Person"): (ABOUT_PERSON, [PERSON]),
        (tasks["t3"], "Animal"): ("", [[50, 50, 150, 150]]),
        (tasks["t5"], "Animal"): ("", [[100, 200, 400, 600]]),
    }
    rotated = next(r for r in rows if r["id"].startswith(f"task{tasks['t3']}-"))
    assert (rotated["width"], rotated["height"]) == (480, 640)  # upright size of the EXIF-6 sample
    with Image.open(out / rotated["image"]) as im:
        assert im.size == (480, 640)

    # -- GRPO: same samples, EGM schema, reward 1.0 on its own ground truth
    table = pq.read_table(out / "grpo" / "train.parquet")
    assert table.num_rows == 7
    for row in table.to_pylist():
        gt = row["reward_model"]["ground_truth"]
        assert len(gt) == 4 and row["extra_info"]["split"] == "train"
        own = "x\n</think>\n\n```json\n" + json.dumps([{"bbox_2d": gt}]) + "\n```"
        assert compute_score(row["data_source"], own, gt, row["extra_info"]) == 1.0

    # -- COCO: pixels of the upright image
    coco = json.loads((out / "coco" / "train.json").read_text())
    assert sorted(i["id"] for i in coco["images"]) == sorted(tasks[k] for k in ("t1", "t2", "t3", "t5"))
    assert len(coco["annotations"]) == 7
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    t3_boxes = {cats[a["category_id"]]: a["bbox"] for a in coco["annotations"] if a["image_id"] == tasks["t3"]}
    person_px = grid_to_pixels(Box(*PERSON), 480, 640)
    assert t3_boxes["Person"] == pytest.approx([person_px.x1, person_px.y1, person_px.width, person_px.height])
    assert t3_boxes["Animal"] == pytest.approx([24.0, 32.0, 48.0, 64.0])


def test_export_filters(label_studio, settings, tmp_path):
    built = build_project(label_studio, settings)
    pid, anns = built["project"], built["annotations"]
    only = _export(settings, pid, tmp_path / "only", "--from-predictions", "--format", "sft", "--val-fraction", "0")
    statuses = {r["annotation_id"]: r["status"] for r in _jsonl(tmp_path / "only" / "annotations.jsonl")}
    assert statuses[anns["t5"]] == "filtered_no_prediction"
    assert only["tasks"]["exported"] == 3 and only["datasets"] == {"sft": {"train": 6, "val": 0}}
    assert not (tmp_path / "only" / "grpo").exists() and not (tmp_path / "only" / "coco").exists()

    other = _export(settings, pid, tmp_path / "other", "--model-version", "someone-else")
    assert other["tasks"]["exported"] == 0 and other["annotations"]["by_status"]["filtered_model_version"] == 3
    assert other["corrections"]["overall"]["predicted"] == 0


def test_corrected_samples_get_worker_rationales_that_agree_with_the_human(label_studio, settings, tmp_path):
    """``--corrected-reasoning rationale``: a real worker process writes rationales; one whose own
    answer disagrees with the human's box is thrown away (that sample stays answer-only)."""
    built = build_project(label_studio, settings)
    tasks = built["tasks"]
    # the scripted model always answers the box the annotator moved t2's Person to
    response = ("The {label} is where the hint says, left of the centre.\n</think>\n\n```json\n"
                "[{{\"bbox_2d\": [150, 150, 450, 900], \"label\": \"{label}\"}}]\n```")
    worker = spawn_worker(settings, tmp_path / "worker.log", EGM_SCRIPTED_RESPONSE=response)
    try:
        report = _export(settings, built["project"], tmp_path / "out", "--format", "sft", "--val-fraction", "0",
                         "--corrected-reasoning", "rationale", "--rationale-timeout", "120")
    finally:
        processes.stop(worker)
    assert report["samples"]["reasoning"] == {"model": 3, "rationale": 1, "none": 3}
    answers = {}
    for row in _jsonl(tmp_path / "out" / "sft" / "train.jsonl"):
        label = row["conversations"][0]["value"].split("Locate ", 1)[1].split(",", 1)[0]
        answers[(int(row["id"].split("-")[0].removeprefix("task")), label)] = row["conversations"][1]["value"]
    assert answers[(tasks["t2"], "Person")].startswith("The Person is where the hint says, left of the centre.\n"
                                                       "</think>\n\n```json\n[\n\t{\"bbox_2d\": [150, 150, 450, 900]")
    assert answers[(tasks["t2"], "Animal")].startswith("\n</think>")  # the model's box is not the human's
    assert answers[(tasks["t1"], "Person")].startswith(ABOUT_PERSON + "\n</think>")


# --------------------------------------------------------------------------- live figures from webhooks


def _wait_for_hooks(stub: StubMLBackend, count: int, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hooks = [r.body for r in stub.received("/webhook") if isinstance(r.body, dict)
                 and str(r.body.get("action", "")).startswith("ANNOTATION")]
        if len(hooks) >= count:
            return hooks
        time.sleep(0.05)
    return [r.body for r in stub.received("/webhook")]


def _figures(settings) -> dict[tuple, float]:
    body, _ = MetricsCollector(settings, QueueClient(settings)).render()
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(("egm_corrections_total{", "egm_correction_annotations_total{")):
            name, _, value = line.rpartition(" ")
            labels = dict(part.split("=", 1) for part in name[name.index("{") + 1:-1].split(","))
            labels = {k: v.strip('"') for k, v in labels.items()}
            key = (name[:name.index("{")], labels.get("kind"), labels.get("label"), labels["model_version"])
            out[key] = float(value)
    return {k: v for k, v in out.items() if v}


def _replay(handler: WebhookHandler, events: list[dict]) -> None:
    for event in events:
        handler.handle(WebhookEvent.model_validate(event))
    assert handler.drain(timeout_s=60)


def test_webhooks_keep_correction_figures_current(label_studio, settings):
    stub = StubMLBackend().start()
    try:
        built = build_project(label_studio, settings, stub)
        # created: t1_draft, t1, t2, t3, t4 (cancelled), t5 (no prediction)
        events = _wait_for_hooks(stub, 6)
        assert sum(e["action"] == "ANNOTATION_CREATED" for e in events) == 6
        handler = WebhookHandler(settings, QueueClient(settings).redis)
        _replay(handler, events)
        mv = MODEL_VERSION
        c = "egm_corrections_total"
        assert _figures(settings) == {
            (c, "accepted", "Person", mv): 2, (c, "moved", "Person", mv): 2,  # t1, t3 | t1 draft, t2
            (c, "accepted", "Vehicle", mv): 1, (c, "deleted", "Vehicle", mv): 2,  # t1 | t1 draft, t3
            (c, "relabeled", "Vehicle", mv): 1, (c, "added", "Animal", mv): 1,  # t2 | t3
            ("egm_correction_annotations_total", None, None, mv): 4,
        }

        # The annotator puts t2's Person back where the model had it, and t3's annotation is deleted.
        preds, anns = built["predictions"], built["annotations"]
        r2 = _rects(preds[built["tasks"]["t2"]].result)
        label_studio.call("PATCH", f"/api/annotations/{anns['t2']}/",
                          json={"result": [r2["Person"], _relabeled(r2["Vehicle"], "Animal")]})
        label_studio.call("DELETE", f"/api/annotations/{anns['t3']}/")
        later = _wait_for_hooks(stub, 8)[len(events):]
        assert sorted(e["action"] for e in later) == ["ANNOTATIONS_DELETED", "ANNOTATION_UPDATED"]
        _replay(handler, sorted(later, key=lambda e: e["action"] != "ANNOTATION_UPDATED"))
        assert _figures(settings) == {
            (c, "accepted", "Person", mv): 2, (c, "moved", "Person", mv): 1,  # t1, t2 | t1 draft
            (c, "accepted", "Vehicle", mv): 1, (c, "deleted", "Vehicle", mv): 1,  # t1 | t1 draft
            (c, "relabeled", "Vehicle", mv): 1,  # t2
            ("egm_correction_annotations_total", None, None, mv): 3,
        }
        # replaying an event twice changes nothing (figures are per annotation, not per event)
        _replay(handler, later)
        assert _figures(settings)[(c, "moved", "Person", mv)] == 1
        handler.close()
    finally:
        stub.stop()
