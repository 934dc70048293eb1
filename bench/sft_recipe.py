"""Try a fine-tuning recipe in minutes: the loop's model trained on scenes' true boxes, no Label Studio.

The closed loop (bench/loop.py, docs/loop.md) takes an hour of CPU before its GPU call: v0
pre-annotates, an annotator corrects through Label Studio, the export writes the data. The
trainer only ever sees that export, and after corrections the export's rows are the scenes'
true boxes. So a recipe (data size, picture variants, learning rate, time) can be tried on
those rows directly: this script writes them as the export writes them (one referring row per
label of a scene, as ``egm-assist export`` does), adds the multi-category rows and the variants
the GPU call adds, trains the same model with the same trainer, and measures the same way
(:mod:`egm.worker.training.heldout`, the worker's engine), on held-out scenes and on train
scenes: a high train figure with a low held-out one is a model learning its pictures by heart.

    python3 bench/sft_recipe.py --train 300 --seconds 1500                  # CPU, ~30 min
    python3 bench/sft_recipe.py --train 2000 --seconds 240 --augment none   # GPU machine

Writes ``bench/results/sft-recipe-<machine>-<tag>.json`` (curves and figures) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rooms import REPO, map_rooms  # noqa: E402

map_rooms()

from loop import HELDOUT_SEED_BASE, PIXELS, SHAPES_CONFIG, TRAINED_SIZE  # noqa: E402 - the loop's own scenes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=300, help="train scenes (300)")
    p.add_argument("--heldout", type=int, default=48, help="held-out scenes measured at the end (48)")
    p.add_argument("--curve-scenes", type=int, default=24, help="scenes of each split in the learning curve (24)")
    p.add_argument("--seconds", type=float, default=1500, help="training time (1500)")
    p.add_argument("--eval-every", type=float, default=500, help="seconds between learning-curve points (500)")
    p.add_argument("--augment", default="mirror,channels", help="mirror, channels, both (default) or none")
    p.add_argument("--no-multi-rows", action="store_true", help="leave out the multi-category rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", default=TRAINED_SIZE, help=f"model size preset (worker/tiny_model.py; {TRAINED_SIZE})")
    p.add_argument("--pixels", type=int, default=PIXELS, help=f"image budget ({PIXELS}, EGM's SFT budget)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's choice)")
    p.add_argument("--dir", type=Path, default=REPO / ".loop" / "recipe", help="where scenes are written")
    p.add_argument("--tag", default="", help="name of this try in the results file (default: from the options)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)

    import torch
    from egm.config.settings import Settings
    from egm.worker.tiny_model import build_model_and_processor
    from egm.worker.training.heldout import HeldOut, evaluate
    from egm.worker.training.sft import SftConfig, train_sft
    from egm.worker.training.sft_data import (
        SftRow,
        augment_rows,
        augmentation_kinds,
        encode_rows,
        multi_category_rows,
        plain_questions,
    )

    from egm.labelstudio.config import parse_labeling_config
    from egm.parsing import format_completion
    from egm.prompts import PromptTemplates, load_templates
    from egm.scenes import read_scenes, scene_file, write_scenes

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    kinds = augmentation_kinds(args.augment)
    tag = args.tag or f"{args.train}-{'+'.join(kinds) or 'none'}-{int(args.seconds)}s"

    train_dir, held_dir = args.dir / f"train-{args.train}", args.dir / f"heldout-{args.heldout}"
    for folder, seeds in ((train_dir, range(args.train)),
                          (held_dir, range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + args.heldout))):
        if not (folder / "scenes.jsonl").is_file():
            write_scenes(folder, seeds)
    templates: PromptTemplates = load_templates(Settings())
    target = parse_labeling_config(SHAPES_CONFIG.read_text()).target
    multi_prompt = templates.multi_prompt(target.labels)

    rows = [SftRow(f"{s.seed}-{o.label}", train_dir / scene_file(s.seed), "", templates.referring_prompt(o.label),
                   format_completion("", [(o.grid.to_list(0), o.label)]))
            for s in read_scenes(train_dir) for o in s.objects]
    rows += [] if args.no_multi_rows else multi_category_rows(rows, target.labels, multi_prompt)
    rows = augment_rows(rows, kinds, plain_questions(templates, target.labels))

    model, processor = build_model_and_processor(device=device, dtype=torch.float32, size=args.size, seed=0,
                                                 min_pixels=args.pixels, max_pixels=args.pixels)
    data = encode_rows(rows, processor, model, min_pixels=args.pixels, max_pixels=args.pixels).to(device)
    print(f"{tag}: {data.stats()} on {device}", flush=True)

    def split(folder: Path, n: int) -> HeldOut:
        return HeldOut(read_scenes(folder)[:n], folder, templates, target, args.pixels, args.pixels,
                       batch_size=64)

    heldout, curve_held, curve_train = (split(held_dir, args.heldout), split(held_dir, args.curve_scenes),
                                        split(train_dir, args.curve_scenes))

    def figures(m, which: HeldOut) -> dict:
        r = evaluate(m, processor, which, modes=("multi",))["multi"]
        return {k: r[k] for k in ("found_share", "mean_iou", "precision", "objects")}

    def measure(m) -> dict:
        held, seen = figures(m, curve_held), figures(m, curve_train)
        print(f"    held-out found@0.5 {held['found_share']:.1%} (IoU {held['mean_iou']:.3f}), "
              f"train scenes {seen['found_share']:.1%} (IoU {seen['mean_iou']:.3f})", flush=True)
        return {"found_share": held["found_share"], "mean_iou": held["mean_iou"],
                "train_found_share": seen["found_share"], "train_mean_iou": seen["mean_iou"]}

    config = SftConfig(seconds=args.seconds, batch_size=args.batch_size, lr=args.lr, warmup_steps=50,
                       eval_every_s=args.eval_every, log_every=20)
    started = time.monotonic()
    trained = train_sft(model, data, config, measure=measure)
    final = {"heldout": figures(model, heldout), "train_scenes": figures(model, curve_train)}
    result = {
        "tag": tag, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "options": vars(args) | {"dir": str(args.dir),
                                                                                              "results": None},
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
        "parameters": sum(p.numel() for p in model.parameters()), "rows": data.stats(),
        "steps": trained["steps"], "epochs": trained["epochs"], "samples_per_second": trained["samples_per_second"],
        "final_loss": trained["final_loss"], "loss_curve": trained["loss_curve"],
        "eval_curve": trained["eval_curve"], "final": final, "wall_seconds": round(time.monotonic() - started, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    machine = "gpu-" + torch.cuda.get_device_name(0).lower().replace(" ", "-") if cuda else "cpu"
    path = args.results / f"sft-recipe-{machine}-{tag}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\n| try | rows | steps | epochs | final loss | held-out found@0.5 | held-out IoU | train found@0.5 |\n"
          f"|---|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {tag} | {data.stats()['rows']} | {trained['steps']} | {trained['epochs']} | {trained['final_loss']} | "
          f"{final['heldout']['found_share']:.1%} | {final['heldout']['mean_iou']:.3f} | "
          f"{final['train_scenes']['found_share']:.1%} |\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
