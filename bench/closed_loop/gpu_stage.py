"""The loop's GPU call: fine-tune v0 on the export, measure on held-out scenes, write v1.

One call of at most ten minutes, so every phase is bounded by time and the call as a whole
by ``--deadline``; what is done is written to ``--out`` at once (v1 before GRPO starts), so a
call cut short still returns its model and figures:

1. the model to train: the manifest's size (``small``) with random weights, or ``--init`` (a
   checkpoint of an earlier call, to train further); its held-out figures before training;
2. the SFT JSONL read as qwen-vl-finetune reads it (+ one multi-category row per image, + the
   rows' mirrored and recoloured variants, ``--augment``), trained with transformers' Trainer,
   with a learning curve on held-out scenes and on train scenes (the gap between the two shows
   a model learning its pictures by heart rather than learning to box);
3. v1's held-out figures in both prompt modes; ``v1.tar`` (bf16 weights, tokenizer, processor);
4. GRPO with TRL on the GRPO parquet and the exported reward, from v1; its figures;
   ``v1-grpo.tar``;
5. ``loop-gpu.json`` (all figures and curves) and ``train.log`` throughout.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

#: seconds kept back from the SFT budget for what follows it (evaluations, saving, GRPO's start-up)
RESERVE_AFTER_SFT_S = 75
HELDOUT_CURVE_SCENES = 64
GRPO_MAX_ROWS = 1024


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)


def run_gpu_stage(ws, out: Path, args) -> int:
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a", encoding="utf-8")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(saved[0], log), _Tee(saved[1], log)
    figures: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "phases": {}}
    try:
        return _run(ws, out, args, figures)
    except Exception:  # noqa: BLE001 - the figures so far and the traceback must come back
        figures["error"] = traceback.format_exc()
        print(figures["error"], file=sys.stderr)
        return 1
    finally:
        _write(out, figures)
        sys.stdout, sys.stderr = saved
        log.close()


def _run(ws, out: Path, args, figures: dict) -> int:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from egm.contract import LabelTarget
    from egm.prompts import PromptTemplates
    from egm.scenes import read_scenes, write_scenes
    from egm.worker.training.heldout import HeldOut, evaluate
    from egm.worker.training.sft import SftConfig, train_sft
    from egm.worker.training.sft_data import (
        augment_rows,
        augmentation_kinds,
        encode_rows,
        multi_category_rows,
        plain_questions,
        read_sft_jsonl,
    )

    t0 = time.monotonic()
    deadline = t0 + args.deadline
    manifest = ws.manifest()
    budget = manifest["budget"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    figures.update(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
                   manifest={k: v for k, v in manifest.items() if k != "labeling_config"})
    if args.init:
        print(f"[{_t(t0)}] loading {args.init} on {device}", flush=True)
        model = AutoModelForImageTextToText.from_pretrained(args.init, dtype=torch.float32).to(device)
        processor = AutoProcessor.from_pretrained(args.init)
        figures["start"] = str(args.init)
    else:
        from egm.worker.tiny_model import build_model_and_processor

        size = manifest["model_size"]
        print(f"[{_t(t0)}] building the {size} model with random weights on {device}", flush=True)
        model, processor = build_model_and_processor(device=str(device), dtype=torch.float32, size=size,
                                                     seed=manifest.get("seed", 0), min_pixels=budget["min_pixels"],
                                                     max_pixels=budget["max_pixels"])
        figures["start"] = f"{size}, random weights"
    figures["parameters"] = sum(p.numel() for p in model.parameters())

    templates = PromptTemplates(**manifest["templates"])
    target = LabelTarget(**manifest["target"])
    scenes = read_scenes(ws.scenes("heldout"))
    heldout = HeldOut(scenes[:16] if args.tiny else scenes, ws.scenes("heldout"), templates, target,
                      budget["min_pixels"], budget["max_pixels"], max_new_tokens=budget["max_new_tokens"],
                      batch_size=16 if args.tiny else 128)
    curve_set = heldout.subset(8 if args.tiny else HELDOUT_CURVE_SCENES)
    # the same number of train scenes, drawn again from their seeds (scenes are deterministic)
    train_split = manifest["scenes"]["train"]
    train_seeds = range(train_split["first_seed"], train_split["first_seed"] + min(len(curve_set.scenes),
                                                                                   train_split["count"]))
    train_dir = ws.scenes("train-curve")  # in the loop's folder, not in out: out's files come back
    train_set = replace(curve_set, scenes=write_scenes(train_dir, train_seeds), images=train_dir)

    def phase(name: str, fn):
        started = time.monotonic()
        result = fn()
        figures["phases"][name] = round(time.monotonic() - started, 1)
        print(f"[{_t(t0)}] {name}: {figures['phases'][name]} s", flush=True)
        _write(out, figures)
        return result

    figures["start_scores"] = phase("evaluate the start", lambda: evaluate(model, processor, heldout,
                                                                          modes=("multi",)))
    _print_scores("start", figures["start_scores"])

    # ---- SFT
    export = ws.export
    rows = read_sft_jsonl(export / "sft" / "train.jsonl", export)
    multi_prompt = templates.multi_prompt(target.labels)
    derived = [] if args.no_multi_rows else multi_category_rows(rows, target.labels, multi_prompt)
    if args.tiny:
        rows, derived = rows[:24], derived[:8]
    kinds = augmentation_kinds(args.augment)
    train_rows = augment_rows(rows + derived, kinds, plain_questions(templates, target.labels))
    data = phase("encode", lambda: encode_rows(train_rows, processor, model, min_pixels=budget["min_pixels"],
                                               max_pixels=budget["max_pixels"]).to(device))
    figures["sft_rows"] = {"export_rows": len(rows), "multi_category_rows": len(derived), "augment": list(kinds),
                           "variant_rows": len(train_rows) - len(rows) - len(derived), **data.stats()}
    grpo_share = args.grpo_seconds if _has_trl() and args.grpo_seconds > 0 else 0
    seconds = 8 if args.tiny else min(args.sft_seconds, deadline - time.monotonic() - RESERVE_AFTER_SFT_S - grpo_share)
    config = SftConfig(seconds=max(10.0, seconds), batch_size=4 if args.tiny else args.batch_size, lr=args.lr,
                       warmup_steps=5 if args.tiny else 100, eval_every_s=5 if args.tiny else 45,
                       log_every=1 if args.tiny else 25)
    print(f"[{_t(t0)}] SFT on {len(data)} rows for {config.seconds:.0f} s", flush=True)

    def measure(m) -> dict:
        held = evaluate(m, processor, curve_set, modes=("multi",))["multi"]
        seen = evaluate(m, processor, train_set, modes=("multi",))["multi"]
        print(f"    {len(curve_set.scenes)} held-out scenes: found@0.5 {held['found_share']:.1%}, "
              f"mean IoU {held['mean_iou']:.3f}; {len(train_set.scenes)} train scenes: found@0.5 "
              f"{seen['found_share']:.1%}, mean IoU {seen['mean_iou']:.3f}", flush=True)
        return {"found_share": held["found_share"], "mean_iou": held["mean_iou"],
                "train_found_share": seen["found_share"], "train_mean_iou": seen["mean_iou"]}

    figures["sft"] = phase("sft", lambda: train_sft(model, data, config, measure=measure))
    data.pixel_values = []  # the encoded images are not needed any more; GRPO has its own
    figures["v1"] = phase("evaluate v1", lambda: evaluate(model, processor, heldout))
    _print_scores("v1", figures["v1"])
    figures["v1_train_scenes"] = evaluate(model, processor, train_set, modes=("multi",))
    _print_scores("v1 on train scenes", figures["v1_train_scenes"])
    phase("save v1", lambda: _save(model, processor, out / "v1.tar", figures, "v1"))

    # ---- GRPO
    if args.grpo_seconds <= 0:
        figures["grpo"] = {"skipped": "--grpo-seconds 0"}
        return 0
    if not _has_trl():
        figures["grpo"] = {"skipped": "TRL is not installed (pip install trl datasets)"}
        print("GRPO skipped: TRL is not installed", flush=True)
        return 0
    from egm.worker.training.grpo import GrpoConfig, load_reward, read_grpo_parquet, train_grpo

    grpo_rows = read_grpo_parquet(export / "grpo" / "train.parquet", export)
    # a short phase sees a few hundred prompts: a seeded sample keeps TRL's dataset build short
    random.Random(manifest.get("seed", 0)).shuffle(grpo_rows)
    grpo_rows = grpo_rows[:8 if args.tiny else GRPO_MAX_ROWS]
    left = deadline - time.monotonic() - 40
    if left < 20:
        figures["grpo"] = {"skipped": f"no time left ({left:.0f} s)"}
        return 0
    gconfig = GrpoConfig(seconds=5 if args.tiny else min(args.grpo_seconds, left), lr=args.grpo_lr,
                         prompts_per_step=2 if args.tiny else 16, generations=2 if args.tiny else 8,
                         max_completion_tokens=24 if args.tiny else 96)
    reward = load_reward(export / "grpo" / "reward.py")
    figures["grpo"] = phase("grpo", lambda: train_grpo(model, processor, grpo_rows, reward, gconfig))
    curve = figures["grpo"]["reward_curve"]
    if curve:
        print(f"    GRPO: {figures['grpo']['steps']} steps, reward {curve[0]['reward']:.3f} -> "
              f"{figures['grpo']['last_rewards_mean']:.3f} (mean of the last 5 steps)", flush=True)
    figures["v1_grpo"] = phase("evaluate v1-grpo", lambda: evaluate(model, processor, heldout))
    _print_scores("v1-grpo", figures["v1_grpo"])
    phase("save v1-grpo", lambda: _save(model, processor, out / "v1-grpo.tar", figures, "v1-grpo"))
    figures["seconds"] = round(time.monotonic() - t0, 1)
    return 0


def _has_trl() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))


def _save(model: Any, processor: Any, tar_path: Path, figures: dict, name: str) -> None:
    """bf16 weights + tokenizer + processor + provenance, as one tar (the GPU call returns few files)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=state)
        processor.save_pretrained(folder)
        (folder / "egm_loop.json").write_text(json.dumps({
            "name": name, "trained_from": figures.get("start"), "device": figures.get("device"),
            "sft": {k: figures.get("sft", {}).get(k) for k in ("steps", "samples", "epochs", "train_seconds")},
            "heldout": figures.get("v1" if name == "v1" else "v1_grpo"),
        }, indent=2) + "\n")
        with tarfile.open(tar_path, "w") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
    print(f"    wrote {tar_path} ({tar_path.stat().st_size / 1e6:.1f} MB)", flush=True)


def _print_scores(name: str, results: dict) -> None:
    for mode, r in results.items():
        print(f"    {name} {mode}: found@0.5 {r['found_share']:.1%}  mean IoU {r['mean_iou']:.3f}  "
              f"precision {r['precision']:.1%}  ({r['objects']} objects, {r['requests']} requests, {r['seconds']} s)",
              flush=True)


def _write(out: Path, figures: dict) -> None:
    tmp = out / ".loop-gpu.json.tmp"
    tmp.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    tmp.replace(out / "loop-gpu.json")


def _t(t0: float) -> str:
    return f"{time.monotonic() - t0:6.1f}s"
