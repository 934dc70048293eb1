"""The closed loop's training side, on the CPU at tiny size: data read like qwen-vl-finetune, GRPO rows
read like verl, the exported reward called like verl calls it, the annotator's corrections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from egm.worker.tiny_model import build_model_and_processor
from egm.worker.training.grpo import GrpoDataError, load_reward, read_grpo_parquet
from egm.worker.training.sft_data import (
    IGNORE_INDEX,
    SftDataError,
    apply_variant,
    augment_rows,
    encode_rows,
    multi_category_rows,
    read_sft_jsonl,
)

from egm.contract import LabelTarget
from egm.export.reward import compute_score
from egm.geometry import Box
from egm.parsing import format_completion, parse_completion
from egm.scenes import Scene, SceneObject, write_scenes

PIXELS = 64 * 32 * 32
LABELS = ["circle", "square", "triangle"]
MULTI = 'Locate every instance that belongs to the following categories: "circle, square, triangle". ' \
        'Report bbox coordinates in JSON format.'
TARGET = LabelTarget(from_name="label", to_name="image", labels=LABELS, aliases={x: x for x in LABELS})


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An export folder as egm-assist writes it: images/, sft/train.jsonl, grpo/train.parquet + reward.py."""
    root = tmp_path_factory.mktemp("export")
    scenes = write_scenes(root / "images", range(4))
    (root / "sft").mkdir()
    (root / "grpo").mkdir()
    sft, grpo = [], []
    for scene in scenes:
        for obj in scene.objects:
            box = obj.grid.to_list(0)
            sft.append({"id": f"s{scene.seed}-{obj.label}", "image": f"images/scene-{scene.seed}.jpg",
                        "height": scene.height, "width": scene.width, "conversations": [
                            {"from": "human", "value": f"<image>\nLocate {obj.label}, output its bbox coordinates "
                                                       f"using JSON format."},
                            {"from": "gpt", "value": format_completion("", [(box, obj.label)])}]})
            grpo.append({"data_source": "grounding", "images": [f"images/scene-{scene.seed}.jpg"],
                         "prompt": [{"role": "user", "content": f"<image>\nLocate {obj.label}, output its bbox "
                                                                 f"coordinates using JSON format"}],
                         "reward_model": {"style": "rule", "ground_truth": box},
                         "extra_info": {"split": "train", "index": len(grpo), "question": obj.label}})
    (root / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pq.write_table(pa.Table.from_pylist(grpo), root / "grpo" / "train.parquet")
    shutil.copy(Path(__file__).resolve().parents[1] / "egm" / "export" / "reward.py", root / "grpo" / "reward.py")
    return root


@pytest.fixture(scope="module")
def model_and_processor():
    return build_model_and_processor(size="tiny", min_pixels=PIXELS, max_pixels=PIXELS)


# --------------------------------------------------------------------------- SFT rows


def test_rows_are_encoded_exactly_as_the_processor_tokenizes_the_conversation(export, model_and_processor) -> None:
    model, processor = model_and_processor
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    data = encode_rows(rows, processor, model, min_pixels=PIXELS, max_pixels=PIXELS)
    assert len(data) == len(rows) and len(data.pixel_values) == 4, "one preprocessing per image"
    for row, enc in zip(rows, data.rows):
        reference = processor.apply_chat_template(row.messages(), tokenize=True, return_dict=True,
                                                  return_tensors="pt")
        assert torch.equal(reference["input_ids"][0], enc.input_ids)
        assert torch.equal(reference["pixel_values"], data.pixel_values[enc.image])
        assert torch.equal(reference["mm_token_type_ids"][0], enc.mm_token_type_ids)
        # the loss is on the answer only: <think>..., the JSON, <|im_end|> and its newline
        trained = processor.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX])
        assert trained == "<think>\n\n</think>\n\n" + row.answer.split("</think>\n\n")[1] + "<|im_end|>\n"
        assert "Locate" not in trained


def test_precomputed_positions_give_the_models_own_loss(export, model_and_processor) -> None:
    model, processor = model_and_processor
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    data = encode_rows(rows[:3], processor, model, min_pixels=PIXELS, max_pixels=PIXELS)
    batch = data.collate([0, 1, 2])
    with torch.no_grad():
        ours = model(**batch).loss
        batch.pop("position_ids")
        models_own = model(**batch).loss
    assert ours == pytest.approx(float(models_own), rel=1e-5)


def test_multi_category_rows_list_each_images_boxes_in_label_order(export) -> None:
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    multi = multi_category_rows(rows, LABELS, MULTI)
    assert len(multi) == 4 and all(m.after == MULTI for m in multi)
    for m in multi:
        mine = [r for r in rows if r.image == m.image]
        boxes = parse_completion(m.answer).boxes
        assert [b.label for b in boxes] == sorted((parse_completion(r.answer).boxes[0].label for r in mine),
                                                  key=LABELS.index)
        assert {tuple(b.box.to_list()) for b in boxes} == {tuple(parse_completion(r.answer).boxes[0].box.to_list())
                                                           for r in mine}
    typed = [r for r in rows]
    typed[0] = type(typed[0])(**{**typed[0].__dict__, "answer": format_completion("", [([1, 2, 3, 4], "red ball")])})
    assert len(multi_category_rows(typed, LABELS, MULTI)) == 3, "an image with a typed expression gets none"


def _plain(labels=LABELS) -> set[str]:
    return {f"Locate {label}, output its bbox coordinates using JSON format." for label in labels} | {MULTI}


def test_augmented_rows_move_the_boxes_with_the_picture(export, model_and_processor) -> None:
    model, processor = model_and_processor
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    rows += multi_category_rows(rows, LABELS, MULTI)
    out = augment_rows(rows, ("mirror", "channels"), _plain())
    assert out[:len(rows)] == rows, "the rows themselves come first, unchanged"
    variants = out[len(rows):]
    assert len(variants) == 5 * len(rows), "mirrored, two colour rotations, and both combined"
    for v in variants:
        original = next(r for r in rows if v.id.startswith(r.id + "-") and v.id[len(r.id) + 1:] == v.variant.replace("+", "-"))
        assert (v.image, v.before, v.after) == (original.image, original.before, original.after)
        mine, theirs = parse_completion(v.answer).boxes, parse_completion(original.answer).boxes
        assert [b.label for b in mine] == [b.label for b in theirs]
        for a, b in zip(mine, theirs):
            if "mirror" in v.variant:
                assert a.box.to_list() == [1000 - b.box.x2, b.box.y1, 1000 - b.box.x1, b.box.y2]
            else:
                assert a.box == b.box

    # the picture is altered as the answer says: a mirrored scene's shape sits where the mirrored box is
    data = encode_rows(out, processor, model, min_pixels=PIXELS, max_pixels=PIXELS)
    assert len(data.pixel_values) == 4 * 6, "each picture variant is preprocessed once"
    from PIL import Image

    with Image.open(rows[0].image) as im:
        picture = im.convert("RGB")
    mirrored = apply_variant(picture, "mirror")
    assert mirrored.getpixel((0, 5)) == picture.getpixel((picture.width - 1, 5))
    recoloured = apply_variant(picture, "gbr")
    r, g, b = picture.getpixel((3, 3))
    assert recoloured.getpixel((3, 3)) == (g, b, r)


def test_rows_a_variant_would_make_false_get_none(export) -> None:
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    first = rows[0]
    label = parse_completion(first.answer).boxes[0].label
    box = parse_completion(first.answer).boxes[0].box.to_list()
    reasoned = type(first)(**{**first.__dict__, "id": "reasoned",
                              "answer": format_completion(f"The {label} on the left.", [(box, label)])})
    typed = type(first)(**{**first.__dict__, "id": "typed", "after": "Locate the red shape on the left."})
    out = augment_rows([reasoned, typed, first], ("mirror",), _plain())
    assert [r.id for r in out] == ["reasoned", "typed", first.id, f"{first.id}-mirror"], \
        "reasoning and typed expressions can name a side or a colour: no variant"
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_rows(rows, ("rotate",), _plain())


@pytest.mark.parametrize("line, message", [
    ('{"image": "images/scene-0.jpg", "conversations": [{"from": "human", "value": "no image here"}, '
     '{"from": "gpt", "value": "x"}]}', "exactly one <image>"),
    ('{"image": "images/missing.jpg", "conversations": [{"from": "human", "value": "<image>x"}, '
     '{"from": "gpt", "value": "x"}]}', "does not exist"),
    ('{"image": "images/scene-0.jpg", "conversations": [{"from": "gpt", "value": "x"}]}', "one human turn"),
])
def test_bad_rows_are_named_by_file_and_line(export, tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    good = (export / "sft" / "train.jsonl").read_text().splitlines()[0]
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(SftDataError, match=f"bad.jsonl:2: .*{message}"):
        read_sft_jsonl(path, export)


# --------------------------------------------------------------------------- GRPO rows


def test_grpo_rows_accept_every_image_form_verl_uses(export, tmp_path) -> None:
    table = pq.read_table(export / "grpo" / "train.parquet").to_pylist()
    image = export / "images" / "scene-0.jpg"
    forms = [f"images/{image.name}", {"image": f"file://{image}"}, {"path": str(image)},
             {"bytes": image.read_bytes()}]
    rows = [{**table[0], "images": [form]} for form in forms]
    for i, row in enumerate(rows):  # one file per form: a parquet column holds one type
        pq.write_table(pa.Table.from_pylist([row]), tmp_path / f"f{i}.parquet")
    pixels = [read_grpo_parquet(tmp_path / f"f{i}.parquet", export)[0].image.tobytes() for i in range(len(forms))]
    assert len(set(pixels)) == 1
    read = read_grpo_parquet(export / "grpo" / "train.parquet", export)
    assert read[0].before == "" and read[0].after.startswith("Locate ") and read[0].ground_truth == table[0][
        "reward_model"]["ground_truth"]
    pq.write_table(pa.Table.from_pylist([{**table[0], "images": ["images/nope.jpg"]}]), tmp_path / "bad.parquet")
    with pytest.raises(GrpoDataError, match="bad.parquet row 0: image .* does not exist"):
        read_grpo_parquet(tmp_path / "bad.parquet", export)


def test_the_exported_reward_is_called_by_path_with_verls_keywords(export) -> None:
    reward = load_reward(export / "grpo" / "reward.py")
    truth = [100, 100, 300, 300]
    answer = format_completion("", [(truth, "circle")])
    kwargs = dict(data_source="grounding", ground_truth=truth, extra_info={"question": "circle"})
    assert reward(solution_str=answer, **kwargs) == pytest.approx(1.0)
    assert reward(solution_str=answer, **kwargs) == compute_score("grounding", answer, truth)
    assert reward(solution_str="no box", **kwargs) == 0.0


# --------------------------------------------------------------------------- the annotator


def test_annotator_keeps_close_boxes_draws_missing_ones_and_deletes_the_rest() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from closed_loop.annotator import Predicted, correct, predicted_regions

    scene = Scene(1, 400, 300, (SceneObject("circle", Box(40, 30, 120, 110), Box(100, 100, 300, 366.67)),
                                SceneObject("square", Box(200, 150, 300, 250), Box(500, 500, 750, 833.33))))
    predicted = [Predicted("keep", "circle", Box(110, 110, 310, 380)),   # near the circle
                 Predicted("wrong", "square", Box(0, 0, 100, 100)),      # far from the square
                 Predicted("extra", "triangle", Box(500, 500, 750, 833))]  # no triangle in the scene
    fix = correct(scene, predicted, TARGET)
    assert (fix.kept, fix.drawn, fix.deleted) == (1, 1, 2)
    regions = predicted_regions(fix.result, TARGET)
    assert [r.label for r in regions] == ["circle", "square"]
    assert regions[0].id == "keep" and regions[1].id not in {"keep", "wrong", "extra"}
    for region, obj in zip(regions, scene.objects):
        assert region.grid.iou(obj.grid) > 0.99
    assert all(item["original_width"] == 400 and item["original_height"] == 300 for item in fix.result)
