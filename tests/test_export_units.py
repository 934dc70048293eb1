"""Export building blocks without Label Studio: selection, corrections, samples, writers, report."""

from __future__ import annotations

import json
import struct

import pyarrow.parquet as pq
import pytest

from egm.config.settings import Settings
from egm.export.accepted import SelectionOptions, Status, select_accepted
from egm.export.coco import CocoImage, coco_document
from egm.export.corrections import Kind, Tally, match_regions
from egm.export.grpo import schema, write_grpo
from egm.export.images import ImageEntry
from egm.export.regions import Region, parse_result
from egm.export.report import write_report
from egm.export import reward as reward_module
from egm.export.reward import compute_score
from egm.export.samples import AnnotationView, Sample, build_samples, split_of
from egm.export.sft import sft_row, write_sft
from egm.geometry import Box
from egm.labelstudio import ExportedTask, Prediction
from egm.prompts import load_templates

TEMPLATES = load_templates(Settings())


def rect(rid, label, x, y, w, h, ow=800, oh=600):
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": ow, "original_height": oh, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}


def text(rid, words, name="reasoning", geometry=True):
    value = {"text": [words]}
    if geometry:
        value.update(x=1, y=1, width=1, height=1, rotation=0)
    return {"id": rid, "from_name": name, "to_name": "image", "type": "textarea", "value": value}


def region(rid, label, x1, y1, x2, y2):
    return Region(id=rid, label=label, grid=Box(x1, y1, x2, y2))


# --------------------------------------------------------------------------- reading results


def test_parse_result_reads_boxes_on_the_grid_and_their_reasoning():
    parsed = parse_result([rect("a", "Person", 10, 20, 30, 40), text("a", "a man at left"),
                           text("p", "the man", name="prompt", geometry=False),
                           {"type": "rectanglelabels", "from_name": "label", "id": "bad", "value": {"x": 1}},  # no label
                           "junk"], from_name="label", reasoning_from_name="reasoning")
    (r,) = parsed.regions
    assert (r.id, r.label, r.grid.to_list()) == ("a", "Person", [100.0, 200.0, 400.0, 600.0])
    assert (r.original_width, r.original_height, r.text) == (800, 600, "a man at left")
    assert parsed.text_of("prompt") == ["the man"]
    assert len(parsed.notes) == 2


def test_rotated_rectangle_becomes_its_upright_hull():
    item = rect("r", "Car", 50, 10, 20, 10)
    item["value"]["rotation"] = 90
    (r,) = parse_result([item]).regions
    assert r.grid.to_list() == pytest.approx([400.0, 100.0, 500.0, 300.0])


# --------------------------------------------------------------------------- corrections


def test_every_kind_of_correction():
    predicted = [region("a", "Person", 100, 100, 300, 300), region("b", "Person", 500, 100, 700, 300),
                 region("c", "Car", 100, 500, 300, 700), region("d", "Car", 600, 600, 900, 900)]
    final = [region("a", "Person", 100.4, 100, 300, 300.6),  # within tolerance: accepted
             region("b", "Person", 520, 100, 720, 300),  # moved
             region("c", "Dog", 100, 500, 300, 700),  # relabeled
             region("new", "Dog", 0, 900, 50, 1000)]  # added; d deleted
    got = {(c.kind, (c.predicted or c.final).id): c for c in match_regions(predicted, final)}
    assert set(got) == {(Kind.accepted, "a"), (Kind.moved, "b"), (Kind.relabeled, "c"), (Kind.added, "new"),
                        (Kind.deleted, "d")}
    assert got[(Kind.moved, "b")].iou == pytest.approx(180 / 220)
    assert got[(Kind.relabeled, "c")].label == "Car"  # grouped under the model's label
    assert got[(Kind.added, "new")].label == "Dog"


def test_redrawn_box_with_a_new_id_is_matched_by_iou():
    predicted = [region("a", "Person", 100, 100, 300, 300)]
    (c,) = match_regions(predicted, [region("zz", "Person", 110, 100, 310, 300)])
    assert c.kind is Kind.moved and c.predicted.id == "a"
    far = match_regions(predicted, [region("zz", "Person", 600, 600, 700, 700)])
    assert sorted(x.kind.value for x in far) == ["added", "deleted"]


def test_tally_figures():
    tally = Tally()
    predicted = [region("a", "Person", 0, 0, 100, 100), region("b", "Person", 200, 0, 300, 100)]
    tally.add(match_regions(predicted, [region("a", "Person", 0, 0, 100, 100)]), "v1")
    tally.add(match_regions(predicted, [region("a", "Person", 0, 0, 100, 50),
                                        region("b", "Person", 200, 0, 300, 100)]), "v2")
    d = tally.as_dict()
    assert d["overall"]["predicted"] == 4 and d["overall"]["accepted"] == 2 and d["overall"]["deleted"] == 1
    assert d["overall"]["acceptance_rate"] == 0.5
    assert d["overall"]["mean_iou"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-4)
    assert d["by_model_version"]["v1"]["by_label"]["Person"]["deleted"] == 1
    assert d["by_model_version"]["v2"]["moved"] == 1


# --------------------------------------------------------------------------- selection


def task(tid, *annotations):
    return ExportedTask.from_api({"id": tid, "data": {"image": f"/x/{tid}.jpg"}, "annotations": list(annotations)})


def ann(aid, updated, **kw):
    return {"id": aid, "result": [], "updated_at": updated, "created_at": updated, **kw}


def pred(pid, version="v1"):
    return Prediction.from_api({"id": pid, "task": 1, "result": [], "model_version": version})


def statuses(selection):
    return {d.annotation_id: d.status for d in selection.decisions}


def test_newest_annotation_wins_and_cancelled_never_counts():
    sel = select_accepted([task(1, ann(1, "2024-01-01T00:00:00Z"), ann(2, "2024-01-02T00:00:00Z"),
                                ann(3, "2024-01-03T00:00:00Z", was_cancelled=True)),
                           task(2, ann(4, "2024-01-01T00:00:00Z", was_cancelled=True))], {})
    assert statuses(sel) == {1: Status.superseded, 2: Status.accepted, 3: Status.cancelled, 4: Status.cancelled}
    assert [c.annotation.id for c in sel.chosen] == [2]


def test_ground_truth_beats_newer():
    sel = select_accepted([task(1, ann(1, "2024-01-01T00:00:00Z", ground_truth=True),
                                ann(2, "2024-01-05T00:00:00Z"))], {})
    assert [c.annotation.id for c in sel.chosen] == [1]


def test_reviews_only_approved_when_the_edition_has_them():
    approved = ann(1, "2024-01-01T00:00:00Z", reviews=[{"id": 1, "accepted": False, "created_at": "a"},
                                                        {"id": 2, "accepted": True, "created_at": "b"}])
    rejected = ann(2, "2024-01-01T00:00:00Z", reviews=[{"id": 3, "accepted": False, "created_at": "a"}])
    unreviewed = ann(3, "2024-01-01T00:00:00Z")
    tasks = [task(1, approved), task(2, rejected), task(3, unreviewed)]
    sel = select_accepted(tasks, {})
    assert sel.reviews_required
    assert statuses(sel) == {1: Status.accepted, 2: Status.not_approved, 3: Status.not_approved}
    assert len(select_accepted(tasks, {}, SelectionOptions(require_review="no")).chosen) == 3


def test_prediction_filters_apply_to_the_chosen_annotation():
    tasks = [task(1, ann(1, "2024-01-01T00:00:00Z", parent_prediction=10)),
             task(2, ann(2, "2024-01-01T00:00:00Z", parent_prediction=11)),
             task(3, ann(3, "2024-01-01T00:00:00Z", parent_prediction=10), ann(4, "2024-01-02T00:00:00Z"))]
    preds = {10: pred(10, "v1"), 11: pred(11, "v2")}
    only = select_accepted(tasks, preds, SelectionOptions(only_from_predictions=True))
    assert statuses(only) == {1: Status.accepted, 2: Status.accepted, 3: Status.superseded,
                              4: Status.no_prediction}
    v1 = select_accepted(tasks, preds, SelectionOptions(model_versions=("v1",)))
    assert [c.annotation.id for c in v1.chosen] == [1]
    assert statuses(v1)[2] is Status.other_model_version
    assert v1.chosen[0].prediction.model_version == "v1"


# --------------------------------------------------------------------------- samples and writers


IMAGE = ImageEntry(source="/data/upload/1/a.jpg", rel_path="images/abc.jpg", width=800, height=600, sha256="ab" * 32)


def view(final, predicted, **kw):
    return AnnotationView(task_id=7, annotation_id=70, final=final, corrections=match_regions(predicted, final),
                          image=IMAGE, model_version="v1", **kw)


def test_samples_per_label_keep_model_reasoning_only_when_all_accepted():
    a = Region("a", "Person", Box(100, 100, 300, 300), text="Person: a man\nVehicle: a car")
    b = Region("b", "Vehicle", Box(500, 500, 900, 900), text="Person: a man\nVehicle: a car")
    moved_b = Region("b", "Vehicle", Box(520, 500, 900, 900))
    samples = build_samples(view([a, moved_b], [a, b]), ["Person", "Vehicle"])
    by_label = {s.label: s for s in samples}
    assert by_label["Person"].model_reasoning == "a man" and not by_label["Person"].needs_rationale
    assert by_label["Vehicle"].model_reasoning == "" and by_label["Vehicle"].needs_rationale
    assert by_label["Vehicle"].kinds == ["moved"]


def test_samples_of_one_multi_category_answer_keep_only_their_labels_sentences():
    said = "A man stands at the left. The vehicle behind him is red. Nothing else is there."
    a = Region("a", "Person", Box(100, 100, 300, 300), text=said)
    b = Region("b", "Vehicle", Box(500, 500, 900, 900), text=said)
    c = Region("c", "Animal", Box(0, 0, 50, 50), text=said)
    labels = ["Person", "Vehicle", "Animal", "man"]
    by_label = {s.label: s for s in build_samples(view([a, b, c], [a, b, c]), labels)}
    assert by_label["Person"].model_reasoning == ""  # the text never names "Person" ("man" is another label)
    assert by_label["Vehicle"].model_reasoning == "The vehicle behind him is red. Nothing else is there."
    assert by_label["Animal"].model_reasoning == "" and by_label["Animal"].needs_rationale


def test_an_expression_keeps_its_whole_reasoning():
    a = Region("a", "Person", Box(100, 100, 300, 300), text="The man in red. He waves at the car.")
    (s,) = build_samples(view([a], [a], expressions=["the man in red"]), ["Person", "Car"])
    assert s.model_reasoning == "The man in red. He waves at the car."


def test_deleting_a_box_of_the_label_means_corrected():
    a = Region("a", "Person", Box(100, 100, 300, 300), text="two people")
    b = Region("b", "Person", Box(500, 100, 700, 300), text="two people")
    (s,) = build_samples(view([a], [a, b]), ["Person"])
    assert s.needs_rationale and s.boxes == [a.grid]


def test_expression_sample_and_prediction_level_reasoning():
    a = Region("a", "Person", Box(100, 100, 300, 300))
    (s,) = build_samples(view([a], [a], expressions=["the man in red"], prediction_reasoning="He wears red."),
                         ["Person"])
    assert s.query == "the man in red" and s.from_expression and s.model_reasoning == "He wears red."


def test_no_boxes_no_samples():
    assert build_samples(view([], [Region("a", "Person", Box(1, 1, 2, 2))]), ["Person"]) == []


def test_split_is_deterministic_and_roughly_proportional():
    keys = [f"img{i}" for i in range(2000)]
    first = [split_of(k, 0.1) for k in keys]
    assert first == [split_of(k, 0.1) for k in keys]
    assert 120 < first.count("val") < 280
    assert {split_of(k, 0.0) for k in keys} == {"train"}


def sample(query="Person", boxes=((100, 200, 300, 400),), reasoning="", split="train", idx=0):
    return Sample(task_id=idx, annotation_id=10 + idx, query=query, label="Person",
                  boxes=[Box(*b) for b in boxes], image=IMAGE, model_version="v1", reasoning=reasoning, split=split)


def test_sft_row_is_qwen_vl_finetune_format():
    row = sft_row(sample(reasoning="A man stands at left."), TEMPLATES)
    assert set(row) == {"id", "image", "height", "width", "conversations"}
    assert (row["image"], row["width"], row["height"]) == ("images/abc.jpg", 800, 600)
    human, gpt = row["conversations"]
    assert human == {"from": "human", "value": "<image>\nLocate Person, output its bbox coordinates using JSON format."}
    assert gpt["from"] == "gpt"
    assert gpt["value"] == ('A man stands at left.\n</think>\n\n```json\n[\n\t{"bbox_2d": [100, 200, 300, 400], '
                            '"label": "Person"}\n]\n```')
    answer_only = sft_row(sample(), TEMPLATES)["conversations"][1]["value"]
    assert answer_only.startswith("\n</think>\n\n```json\n[\n\t{\"bbox_2d\"")


def test_sft_files_per_split(tmp_path):
    counts = write_sft([sample(split="train"), sample(split="val", idx=1), sample(split="train", idx=2)],
                       tmp_path, TEMPLATES)
    assert counts == {"train": 2, "val": 1}
    lines = (tmp_path / "sft" / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [sample().id, sample(idx=2).id]


def grpo_samples(root):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.new("RGB", (800, 600), (20, 120, 40)).save(root / IMAGE.rel_path, format="JPEG")
    return [sample(split="train"), sample(boxes=((0, 0, 100, 100), (500, 500, 600, 700)), split="train", idx=1),
            sample(split="val", idx=2)]


@pytest.mark.parametrize("mode", ["bytes", "file"])
def test_grpo_parquet_schema_loads_and_rewards(tmp_path, mode):
    import datasets

    samples = grpo_samples(tmp_path)
    assert write_grpo(samples, tmp_path, TEMPLATES, images=mode) == {"train": 2, "val": 1}
    table = pq.read_table(tmp_path / "grpo" / "train.parquet")
    assert table.schema.equals(schema(mode))
    assert table.column_names == ["data_source", "prompt", "images", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    assert rows[0]["data_source"] == "grounding" and rows[0]["ability"] == "grounding"
    assert rows[0]["prompt"] == [{"role": "user",
                                  "content": "<image>\nLocate Person, output its bbox coordinates using JSON format"}]
    image_file = (tmp_path / IMAGE.rel_path).resolve()
    expected = {"bytes": image_file.read_bytes()} if mode == "bytes" else {"image": f"file://{image_file}"}
    assert rows[0]["images"] == [expected]
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": [100, 200, 300, 400]}
    assert rows[1]["data_source"] == "grounding_multi"
    assert rows[1]["reward_model"] == {"style": "rule_multi_box", "ground_truth": [0, 0, 100, 100, 500, 500, 600, 700]}
    assert rows[1]["extra_info"] == {"split": "train", "index": 1, "id": samples[1].id, "height": 600, "width": 800,
                                     "question": "Person"}
    ds = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "grpo" / "train.parquet"),
                                                      "val": str(tmp_path / "grpo" / "val.parquet")})
    assert ds["train"].num_rows == 2 and ds["val"].num_rows == 1
    for row in ds["train"]:
        gt = row["reward_model"]["ground_truth"]
        boxes = [gt[i:i + 4] for i in range(0, len(gt), 4)]
        own = "ok\n</think>\n\n```json\n" + json.dumps([{"bbox_2d": b} for b in boxes]) + "\n```"
        assert compute_score(row["data_source"], own, gt, row["extra_info"]) == 1.0
        assert compute_score(row["data_source"], "no idea", gt, row["extra_info"]) == 0.0
    assert (tmp_path / "grpo" / "reward.py").read_text() == open(reward_module.__file__).read()
    only_train = write_grpo([s for s in samples if s.split == "train"], tmp_path, TEMPLATES, images=mode)
    assert only_train == {"train": 2, "val": 0} and not (tmp_path / "grpo" / "val.parquet").exists()
    single = write_grpo(samples, tmp_path, TEMPLATES, single_only=True, images=mode)
    assert single == {"train": 1, "val": 1}
    assert {r["data_source"] for r in pq.read_table(tmp_path / "grpo" / "train.parquet").to_pylist()} == {"grounding"}


def test_grpo_refuses_an_unknown_image_mode_and_a_missing_image(tmp_path):
    samples = grpo_samples(tmp_path)
    with pytest.raises(ValueError, match="bytes, file"):
        write_grpo(samples, tmp_path, TEMPLATES, images="path")
    for mode in ("bytes", "file"):
        with pytest.raises(FileNotFoundError, match="abc.jpg"):
            write_grpo(samples, tmp_path / "elsewhere", TEMPLATES, images=mode)


def test_coco_boxes_are_pixels_of_the_upright_image():
    regions = [Region("a", "Car", Box(0, 500, 1000, 1000)), Region("b", "Ghost", Box(100, 100, 200, 200))]
    doc = coco_document([CocoImage(task_id=3, image=IMAGE, regions=regions, split="train")], ["Person", "Car"])
    assert doc["images"] == [{"id": 3, "file_name": "images/abc.jpg", "width": 800, "height": 600}]
    assert doc["annotations"][0]["bbox"] == [0.0, 300.0, 800.0, 300.0]
    assert doc["annotations"][0]["category_id"] == 2 and doc["annotations"][0]["area"] == 240000.0
    assert [c["name"] for c in doc["categories"]] == ["Person", "Car", "Ghost"]


def test_report_json_and_png(tmp_path):
    tally = Tally()
    tally.add(match_regions([region("a", "Person", 0, 0, 100, 100)], [region("a", "Person", 0, 0, 100, 90)]), "v1")
    json_path, png_path = write_report({"corrections": tally.as_dict()}, tmp_path)
    assert json.loads(json_path.read_text())["corrections"]["overall"]["moved"] == 1
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1000 and height >= 250
    (tmp_path / "empty").mkdir()
    _, empty_png = write_report({"corrections": Tally().as_dict()}, tmp_path / "empty")
    assert empty_png.read_bytes()[:4] == b"\x89PNG"


def test_worker_rationale_is_kept_only_when_its_answer_agrees():
    from egm.export.rationale import rationale_prompt, usable_rationale

    s = sample(query="the man in red")
    prompt = rationale_prompt(s)
    assert prompt.startswith("Locate the man in red, output its bbox coordinates using JSON format.")
    assert '[100, 200, 300, 400]' in prompt
    agree = 'He wears red.\n</think>\n\n```json\n[{"bbox_2d": [102, 198, 301, 405]}]\n```'
    disagree = 'He wears red.\n</think>\n\n```json\n[{"bbox_2d": [600, 600, 700, 700]}]\n```'
    assert usable_rationale(agree, s) == "He wears red."
    assert usable_rationale(disagree, s) is None
    assert usable_rationale('</think>\n[100, 200, 300, 400]', s) is None  # no reasoning to keep
