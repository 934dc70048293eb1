"""The GRPO export read by its real consumer: verl's own ``RLHFDataset`` and reward manager.

verl (pinned in requirements/verl.txt, installed by the Makefile with ``--no-deps``) loads
the parquet files the export wrote, with ``filter_overlong_prompts`` on as EGM's launch
script sets it (a row verl cannot read is dropped there without a word, so every row must
survive), and the tiny Qwen3-VL processor. Each row then goes through the steps verl's
rollout takes before generating: the dataset's ``process_multi_modal_info`` (qwen_vl_utils
opens the image), the processor's chat template and ``build_multimodal_processor_inputs``,
which must give pixel values and prompt ids with one image pad per merged patch. Finally
verl's naive reward manager, with the reward loaded by verl's ``get_custom_reward_fn`` from
the ``reward.py`` the export wrote and EGM's ``reward_kwargs``, scores decoded completions.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from qwen_vl_utils import smart_resize
from transformers import AutoProcessor
from verl import DataProto
from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
from verl.trainer.ppo.reward import get_custom_reward_fn
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
from verl.utils.tokenizer import build_multimodal_processor_inputs

from egm.config.settings import Settings
from egm.export.grpo import write_grpo
from egm.export.images import ImageEntry
from egm.export.samples import Sample
from egm.geometry import Box
from egm.prompts import load_templates
from tests.test_export_labelstudio import _export, build_project, settings  # noqa: F401 - fixture

EGM_REWARD_KWARGS = {"reward_type": "mix", "alpha": 0.5, "threshold": 0.5}


@pytest.fixture(scope="module")
def processor(tiny_random_model_dir):
    return AutoProcessor.from_pretrained(str(tiny_random_model_dir))


def verl_dataset(files: list[Path], processor, cache: Path) -> tuple[RLHFDataset, object]:
    # workers None: the length filter runs in this process. With a number, datasets forks a pool even
    # for 1, and a fork of a test process that already runs threads (earlier tests) can deadlock.
    config = OmegaConf.create({"filter_overlong_prompts": True, "max_prompt_length": 4096, "truncation": "error",
                               "filter_overlong_prompts_workers": None, "image_key": "images",
                               "cache_dir": str(cache)})
    return RLHFDataset([str(f) for f in files], processor.tokenizer, config, processor=processor), config


def model_inputs(dataset: RLHFDataset, config, processor, index: int) -> tuple[dict, list[Image.Image], dict]:
    """What verl's rollout builds from one dataset item before generating."""
    row = dataset[index]
    messages = row["raw_prompt"]
    images, videos, audios = asyncio.run(RLHFDataset.process_multi_modal_info(
        messages, image_patch_size=dataset.image_patch_size, config=config))
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = build_multimodal_processor_inputs(processor, text=[prompt], images=images, videos=videos, audio=audios,
                                               mm_processor_kwargs={})
    return row, images, inputs


def assert_every_row_reaches_the_model(files: list[Path], processor, cache: Path) -> list[dict]:
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    dataset, config = verl_dataset(files, processor, cache)
    assert len(dataset) == len(rows) > 0  # nothing filtered out
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    items = []
    for i in range(len(dataset)):
        row, images, inputs = model_inputs(dataset, config, processor, i)
        info = row["extra_info"]
        assert row["data_source"] == rows[i]["data_source"] and row["reward_model"] == rows[i]["reward_model"]
        (image,) = images  # the exported image, upright, at the size the row states (resized as qwen_vl_utils does)
        factor = dataset.image_patch_size * merge
        assert image.size[::-1] == smart_resize(info["height"], info["width"], factor=factor)
        pixels, grid, ids = inputs["pixel_values"], inputs["image_grid_thw"], inputs["input_ids"][0]
        assert pixels.ndim == 2 and pixels.shape[0] == int(grid.prod()) > 0 and torch.isfinite(pixels).all()
        assert int((ids == pad).sum()) == int(grid.prod()) // merge**2
        items.append(row)
    return items


def completion(boxes: list[list[int]], label: str) -> str:
    listed = ",\n".join("\t" + json.dumps({"bbox_2d": b, "label": label}) for b in boxes)
    return f"The {label} is there.\n</think>\n\n```json\n[\n{listed}\n]\n```"


def verl_rewards(items: list[dict], texts: list[str], reward_file: Path, tokenizer) -> list[float]:
    """Scores from verl's naive reward manager, decoding the tokenized completions as verl does."""
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": str(reward_file), "name": "compute_score", "reward_kwargs": EGM_REWARD_KWARGS}}})
    manager = NaiveRewardManager(config, tokenizer, get_custom_reward_fn(config))
    scores = []
    for item, text in zip(items, texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        batch = collate_fn([item])
        data = DataProto.from_dict(
            tensors={"prompts": torch.zeros((1, 2), dtype=torch.long), "responses": torch.tensor([ids]),
                     "attention_mask": torch.ones((1, 2 + len(ids)), dtype=torch.long)},
            non_tensors={k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)})
        scores.append(manager.loop.run_until_complete(manager.run_single(data))["reward_score"])
    return scores


def truth_of(item: dict) -> list[list[int]]:
    gt = list(item["reward_model"]["ground_truth"])
    return [gt[i:i + 4] for i in range(0, len(gt), 4)]


# --------------------------------------------------------------------------- written by write_grpo


def _samples(root: Path) -> list[Sample]:
    (root / "images").mkdir(parents=True)
    out = []
    specs = [((640, 480), [(100, 150, 400, 900)]), ((800, 450), [(0, 0, 100, 100), (500, 500, 600, 700)]),
             ((300, 700), [(10, 20, 990, 980)])]
    for i, (size, boxes) in enumerate(specs):
        rel = f"images/img{i}.png"
        Image.new("RGB", size, (40 * i, 90, 160)).save(root / rel)
        image = ImageEntry(source=f"/data/{i}.png", rel_path=rel, width=size[0], height=size[1])
        out.append(Sample(task_id=i, annotation_id=100 + i, query="Shape", label="Shape",
                          boxes=[Box(*b) for b in boxes], image=image, model_version="v1", split="train"))
    return out


@pytest.mark.parametrize("mode", ["bytes", "file"])
def test_grpo_rows_of_both_image_forms_load_and_score_in_verl(tmp_path, processor, mode):
    samples = _samples(tmp_path / "export")
    write_grpo(samples, tmp_path / "export", load_templates(Settings()), images=mode)
    grpo = tmp_path / "export" / "grpo"
    items = assert_every_row_reaches_the_model([grpo / "train.parquet"], processor, tmp_path / "cache")
    assert [i["data_source"] for i in items] == ["grounding", "grounding_multi", "grounding"]
    assert [i["reward_model"]["style"] for i in items] == ["rule", "rule_multi_box", "rule"]

    tokenizer = processor.tokenizer
    right = verl_rewards(items, [completion(truth_of(i), "Shape") for i in items], grpo / "reward.py", tokenizer)
    assert right == [1.0, 1.0, 1.0]
    one_of_two = [completion(truth_of(i)[:1], "Shape") for i in items]
    assert verl_rewards(items, one_of_two, grpo / "reward.py", tokenizer) == [1.0, 0.5, 1.0]
    wrong = verl_rewards(items, [completion([[0, 990, 5, 1000]], "Shape")] * 3, grpo / "reward.py", tokenizer)
    assert wrong == [0.0, 0.0, 0.0]


def test_a_row_verl_cannot_open_is_dropped_by_its_filter(tmp_path, processor):
    """Why every row must load: with filter_overlong_prompts on, verl drops such a row silently."""
    samples = _samples(tmp_path / "export")
    write_grpo(samples, tmp_path / "export", load_templates(Settings()), images="file")
    (tmp_path / "export" / samples[1].image.rel_path).unlink()
    dataset, _ = verl_dataset([tmp_path / "export" / "grpo" / "train.parquet"], processor, tmp_path / "cache")
    assert [dataset[i]["extra_info"]["id"] for i in range(len(dataset))] == [samples[0].id, samples[2].id]


# --------------------------------------------------------------------------- the real export of a project


def test_the_real_export_of_a_label_studio_project_loads_in_verl(label_studio, settings, tmp_path,  # noqa: F811
                                                                 processor):
    built = build_project(label_studio, settings)
    out = tmp_path / "export"
    report = _export(settings, built["project"], out, "--format", "grpo", "--val-fraction", "0")
    assert report["datasets"]["grpo"] == {"train": 7, "val": 0}
    # an empty split gets no file: verl's reader (HF datasets) fails on an empty parquet file
    assert not (out / "grpo" / "val.parquet").exists()
    assert "grpo/val.parquet not written: no rows (verl cannot read an empty parquet file)" in report["warnings"]
    items = assert_every_row_reaches_the_model([out / "grpo" / "train.parquet"], processor, tmp_path / "cache")
    assert len(items) == report["datasets"]["grpo"]["train"] == 7
    sizes = {(i["extra_info"]["width"], i["extra_info"]["height"]) for i in items}
    assert (480, 640) in sizes  # the EXIF-rotated sample, upright

    texts = [completion(truth_of(i), i["extra_info"]["question"]) for i in items]
    assert verl_rewards(items, texts, out / "grpo" / "reward.py", processor.tokenizer) == [1.0] * len(items)
