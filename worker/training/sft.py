"""Supervised fine-tuning with transformers' ``Trainer``, within a wall-clock budget.

The GPU of the closed loop is lent for one call of a few minutes, so training is bounded by
time, not by epochs: the learning rate warms up over ``warmup_steps`` and then follows a
cosine over the *elapsed share of the budget*, and training stops when the budget is spent.
Every ``eval_every_s`` seconds a callback may measure the model (held-out scenes), which
gives the learning curve. The full model is trained (vision tower included): the loop's
model starts from random weights, unlike EGM's SFT which froze a pretrained vision tower.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from egm.worker.training.sft_data import EncodedSft


@dataclass
class SftConfig:
    seconds: float = 270.0
    batch_size: int = 128
    lr: float = 1e-3
    #: the learning rate ends at ``lr * final_lr_share``
    final_lr_share: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every_s: float = 60.0
    log_every: int = 25
    seed: int = 0


class _Clock(TrainerCallback):
    """Stops at the budget, records the loss, and calls ``measure`` every ``eval_every_s``."""

    def __init__(self, config: SftConfig, measure: Callable[[Any], dict] | None) -> None:
        self.config = config
        self.measure = measure
        self.started = time.monotonic()
        self.last_eval = self.started
        self.losses: list[dict] = []
        self.evals: list[dict] = []
        self.model = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started = self.last_eval = time.monotonic()
        self.model = model

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.monotonic()
        if self.measure is not None and now - self.last_eval >= self.config.eval_every_s:
            self.evals.append({"step": state.global_step, "seconds": round(self.elapsed(), 1),
                               **self.measure(model)})
            self.last_eval = time.monotonic()  # measuring is not training time
            self.started += self.last_eval - now
        if self.elapsed() >= self.config.seconds:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append({"step": state.global_step, "seconds": round(self.elapsed(), 1),
                                "loss": round(float(logs["loss"]), 4),
                                "lr": float(logs.get("learning_rate", float("nan")))})


def train_sft(model: Any, data: EncodedSft, config: SftConfig,
              measure: Callable[[Any], dict] | None = None) -> dict:
    """Train ``model`` in place on ``data``; returns steps, samples, throughput and the curves."""
    cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
    clock = _Clock(config, measure)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay, fused=cuda)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        share = min(1.0, clock.elapsed() / config.seconds)
        floor = config.final_lr_share
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * share)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    with tempfile.TemporaryDirectory(prefix="egm-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=config.batch_size, max_steps=10_000_000,
            logging_steps=config.log_every, save_strategy="no", report_to=[], bf16=cuda,
            dataloader_pin_memory=False, dataloader_num_workers=0, remove_unused_columns=False,
            max_grad_norm=config.max_grad_norm, seed=config.seed, disable_tqdm=True,
            use_cpu=not cuda,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate,
                          optimizers=(optimizer, scheduler), callbacks=[clock])
        started = time.monotonic()
        result = trainer.train()
        wall = time.monotonic() - started
    steps = int(result.global_step)
    return {
        "config": asdict(config), "steps": steps, "samples": steps * config.batch_size,
        "epochs": round(steps * config.batch_size / max(1, len(data)), 2),
        "train_seconds": round(clock.elapsed(), 1), "wall_seconds": round(wall, 1),
        "samples_per_second": round(steps * config.batch_size / max(1e-9, clock.elapsed()), 1),
        "final_loss": clock.losses[-1]["loss"] if clock.losses else None,
        "loss_curve": clock.losses, "eval_curve": clock.evals, "data": data.stats(),
    }
