"""GRPO on the exported verl parquet with the exported reward, through TRL's ``GRPOTrainer``.

The rows are read as verl reads them (``prompt``: one user message whose content holds
``<image>``; ``images``: one entry, a path relative to the export folder, ``{"image":
"file://..."}``, ``{"path": ...}`` or ``{"bytes": ...}``; ``reward_model.ground_truth``;
``data_source``; ``extra_info``) and handed to TRL as conversational prompts with an image.
The reward is the export's own ``grpo/reward.py``, loaded by path and called with keyword
arguments as verl calls a custom reward (``compute_score(data_source=..., solution_str=...,
ground_truth=..., extra_info=...)``). Rollouts are sampled at EGM's GRPO temperature (0.7).

Like SFT, a run is bounded by wall-clock time; the reward curve is TRL's logged mean reward
per step.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from egm.images.decode import to_rgb

IMAGE_PLACEHOLDER = "<image>"


class GrpoDataError(ValueError):
    """A parquet row that cannot be used (named by file and row)."""


@dataclass
class GrpoConfig:
    seconds: float = 90.0
    prompts_per_step: int = 16
    generations: int = 8
    lr: float = 3e-5
    #: EGM's GRPO samples its rollouts at 0.7
    temperature: float = 0.7
    max_completion_tokens: int = 128
    #: KL weight to the starting model (TRL's default: none)
    beta: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class GrpoRow:
    before: str
    after: str
    image: Image.Image
    data_source: str
    ground_truth: list
    extra_info: dict


def read_grpo_parquet(path: Path, data_path: Path) -> list[GrpoRow]:
    import pyarrow.parquet as pq

    rows = []
    for index, item in enumerate(pq.read_table(path).to_pylist()):
        where = f"{path} row {index}"
        prompt = item.get("prompt")
        if not isinstance(prompt, list) or len(prompt) != 1 or not isinstance(prompt[0], dict):
            raise GrpoDataError(f"{where}: 'prompt' must be one user message")
        content = prompt[0].get("content")
        if not isinstance(content, str) or content.count(IMAGE_PLACEHOLDER) != 1:
            raise GrpoDataError(f"{where}: the prompt must hold exactly one {IMAGE_PLACEHOLDER}")
        images = item.get("images")
        if not isinstance(images, list) or len(images) != 1:
            raise GrpoDataError(f"{where}: 'images' must hold one image")
        reward_model = item.get("reward_model") or {}
        truth = reward_model.get("ground_truth")
        if not isinstance(truth, list) or not truth:
            raise GrpoDataError(f"{where}: reward_model.ground_truth is missing")
        before, after = content.split(IMAGE_PLACEHOLDER)
        rows.append(GrpoRow(before.strip(), after.strip(), _image(images[0], Path(data_path), where),
                            str(item.get("data_source") or ""), truth, dict(item.get("extra_info") or {})))
    return rows


def _image(entry: Any, data_path: Path, where: str) -> Image.Image:
    """One ``images`` entry in any of the forms verl's multimodal rows use."""
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return _open(io.BytesIO(entry["bytes"]))
        entry = entry.get("image") or entry.get("path")
    if not isinstance(entry, str) or not entry:
        raise GrpoDataError(f"{where}: unsupported image entry {type(entry).__name__}")
    path = Path(entry.removeprefix("file://"))
    path = path if path.is_absolute() else data_path / path
    if not path.is_file():
        raise GrpoDataError(f"{where}: image {path} does not exist")
    return _open(path)


def _open(source: Any) -> Image.Image:
    with Image.open(source) as im:
        return to_rgb(im)


def load_reward(path: Path) -> Callable[..., float]:
    """``compute_score`` of a reward file, loaded by path as verl loads a custom reward."""
    spec = importlib.util.spec_from_file_location("egm_exported_reward", path)
    if spec is None or spec.loader is None:
        raise GrpoDataError(f"cannot load the reward file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "compute_score", None)):
        raise GrpoDataError(f"{path} has no compute_score")
    return module.compute_score


def train_grpo(model: Any, processor: Any, rows: list[GrpoRow], compute_score: Callable[..., float],
               config: GrpoConfig) -> dict:
    """Train ``model`` in place with TRL's GRPOTrainer; returns the reward curve and totals."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    dataset = Dataset.from_list([{
        "prompt": [{"role": "user", "content": _content(row)}], "image": row.image,
        "data_source": row.data_source, "ground_truth": [float(v) for v in _flat(row.ground_truth)],
        "extra_info": json.dumps(row.extra_info, default=str)} for row in rows])

    def reward(prompts, completions, data_source, ground_truth, extra_info, **_):
        return [float(compute_score(data_source=source, solution_str=_text(completion), ground_truth=truth,
                                    extra_info=json.loads(info)))
                for completion, source, truth, info in zip(completions, data_source, ground_truth, extra_info)]

    class Clock(TrainerCallback):
        started = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            Clock.started = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - Clock.started >= config.seconds:
                control.should_training_stop = True
            return control

    with tempfile.TemporaryDirectory(prefix="egm-grpo-") as scratch:
        args = GRPOConfig(
            output_dir=scratch, per_device_train_batch_size=config.prompts_per_step * config.generations,
            num_generations=config.generations, steps_per_generation=1,
            max_completion_length=config.max_completion_tokens, temperature=config.temperature,
            learning_rate=config.lr, lr_scheduler_type="constant", beta=config.beta, max_steps=1_000_000,
            logging_steps=1, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda, seed=config.seed,
            disable_tqdm=True, dataloader_pin_memory=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=processor, callbacks=[Clock()])
        started = time.monotonic()
        trainer.train()
        wall = time.monotonic() - started
    curve = [{"step": h["step"], "reward": round(float(h["reward"]), 4),
              "reward_std": round(float(h.get("reward_std", math.nan)), 4),
              "completion_tokens": round(float(h.get("completions/mean_length", math.nan)), 1)}
             for h in trainer.state.log_history if "reward" in h]
    steps = int(trainer.state.global_step)
    return {"config": asdict(config), "steps": steps, "prompts": steps * config.prompts_per_step,
            "completions": steps * config.prompts_per_step * config.generations, "wall_seconds": round(wall, 1),
            "reward_curve": curve, "rows": len(rows),
            "first_reward": curve[0]["reward"] if curve else None,
            "last_rewards_mean": round(sum(c["reward"] for c in curve[-5:]) / max(1, len(curve[-5:])), 4)
            if curve else None}


def _content(row: GrpoRow) -> list[dict]:
    content = [{"type": "text", "text": row.before}] if row.before else []
    content.append({"type": "image"})
    if row.after:
        content.append({"type": "text", "text": row.after})
    return content


def _flat(truth: list) -> list:
    out = []
    for value in truth:
        out.extend(_flat(value) if isinstance(value, list) else [value])
    return out


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        content = completion[-1].get("content") if completion else ""
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content or ""
    return str(completion)
