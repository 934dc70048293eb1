"""The loop's results: ``bench/results/loop-<machine>.json`` and ``.md``, and the bundled-samples check.

The headline figures are the pipeline's: predictions each model wrote into the held-out
Label Studio project, read back and scored against the scenes' true boxes. The GPU call's
own figures (same scenes, same engine and prompts, measured in the training process) give
the learning curve, both prompt modes and the GRPO reward curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

GOAL_BEFORE, GOAL_AFTER = 0.10, 0.60


def samples_check(ws, model: str) -> dict:
    """Run ``model`` on the bundled sample images (the demo's) as the demo asks, and score it."""
    from egm.contract import LabelTarget
    from egm.parsing import parse_completion
    from egm.prompts import PromptTemplates
    from egm.queries import build_queries
    from egm.scenes import sample_scenes, score
    from egm.worker.engines.base import DecodingConfig, EngineRequest
    from egm.worker.engines.hf import HFEngine

    manifest = ws.manifest()
    budget, target = manifest["budget"], LabelTarget(**manifest["target"])
    templates = PromptTemplates(**manifest["templates"])
    engine = HFEngine(str(ws.model(model)), DecodingConfig(max_new_tokens=budget["max_new_tokens"]),
                      max_pixels=budget["max_pixels"], min_pixels=budget["min_pixels"], device="cpu")
    query = build_queries(target, templates, "multi")[0]
    samples = sample_scenes()
    # upright images, as a worker's loader gives them (rotated_exif6.jpg carries an EXIF rotation)
    outputs = engine.generate([EngineRequest(_upright(path), query.text) for path, _ in samples])
    engine.close()
    pairs, images = [], []
    for (path, scene), out in zip(samples, outputs):
        boxes = [(target.resolve_label(b.label), b.box) for b in parse_completion(out.text).boxes]
        boxes = [(label, box) for label, box in boxes if label is not None]
        pairs.append((scene, boxes))
        images.append({"image": path.name, "answer": out.text,
                       "boxes": [{"label": label, "grid": box.to_list(0)} for label, box in boxes]})
    result = score(pairs).to_json()
    result["images"] = images
    return result


def _upright(path: Path):
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def write_report(ws, *, machine: str, out_dir: Path) -> list[Path]:
    state, manifest = ws.state, ws.manifest()
    gpu = state.get("gpu", {})
    heldout = state.get("heldout", {})
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine,
        "setup": {"scenes": manifest["scenes"], "model_size": manifest["model_size"],
                  "parameters": gpu.get("parameters"), "budget": manifest["budget"],
                  "prompt_mode": manifest["prompt_mode"], "labels": manifest["target"]["labels"],
                  "gpu_device": gpu.get("device")},
        "goal": {"v0_at_most": GOAL_BEFORE, "v1_at_least": GOAL_AFTER,
                 "v0": heldout.get("v0", {}).get("found_share"), "v1": heldout.get("v1", {}).get("found_share"),
                 "met": _met(heldout)},
        "heldout_pipeline": heldout, "stages": state.get("stages", {}), "gpu": gpu,
        "samples": state.get("samples", {}), "model_versions": state.get("versions", {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"loop-{machine}.json", out_dir / f"loop-{machine}.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    print(markdown(report))
    return [json_path, md_path]


def _met(heldout: dict) -> bool | None:
    v0, v1 = heldout.get("v0", {}).get("found_share"), heldout.get("v1", {}).get("found_share")
    if v0 is None or v1 is None:
        return None
    return v0 <= GOAL_BEFORE and v1 >= GOAL_AFTER


def markdown(r: dict) -> str:
    s, gpu = r["setup"], r["gpu"]
    gpu_name = f", GPU {s['gpu_device']}" if s.get("gpu_device") else ""
    lines = [f"# Closed loop: {r['date']}, {r['machine']}{gpu_name}",
             "",
             f"Scenes: {s['scenes']['train']['count']} train, {s['scenes']['heldout']['count']} held-out; "
             f"labels {', '.join(s['labels'])}; trained model `{s['model_size']}` ({_num(s['parameters'])}), "
             f"image budget {s['budget']['max_pixels']} pixels, prompt mode `{s['prompt_mode']}`.", ""]
    lines += ["## Held-out scenes through the pipeline", "",
              "Predictions written to Label Studio by `egm-assist prelabel` (Redis, worker, transformers engine), "
              "read back and scored: an object is found when a box of its label has IoU >= 0.5.", "",
              "| model | model_version | objects | found@0.5 | mean IoU | precision |", "|---|---|---:|---:|---:|---:|"]
    for name, h in r["heldout_pipeline"].items():
        lines.append(f"| {name} | `{h.get('model_version')}` | {h['objects']} | {h['found_share']:.1%} | "
                     f"{h['mean_iou']:.3f} | {h['precision']:.1%} |")
    goal = r["goal"]
    lines += ["", f"Goal: v0 <= {goal['v0_at_most']:.0%}, v1 >= {goal['v1_at_least']:.0%}: "
                  f"**{'met' if goal['met'] else 'not met' if goal['met'] is False else 'not measured yet'}**.", ""]
    if gpu:
        lines += ["## In the GPU call (same scenes, same engine and prompts)", "",
                  "| model | mode | found@0.5 | mean IoU | precision | parse ok / repaired / unparseable |",
                  "|---|---|---:|---:|---:|---|"]
        for name in ("start_scores", "v1", "v1_grpo"):
            for mode, m in (gpu.get(name) or {}).items():
                st = m.get("parse_status", {})
                label = "start (random)" if name == "start_scores" else name.replace('_', '-')
                lines.append(f"| {label} | {mode} | {m['found_share']:.1%} | {m['mean_iou']:.3f} | "
                             f"{m['precision']:.1%} | {st.get('ok', 0)} / {st.get('repaired', 0)} / "
                             f"{st.get('unparseable', 0)} |")
        sft = gpu.get("sft") or {}
        if sft:
            rows = gpu.get("sft_rows", {})
            lines += ["", f"SFT: {rows.get('export_rows')} exported rows + {rows.get('multi_category_rows')} "
                          f"multi-category rows ({rows.get('mean_tokens')} tokens each on average), "
                          f"{sft['steps']} steps of {sft['config']['batch_size']} in {sft['train_seconds']} s "
                          f"({sft['samples_per_second']} rows/s, {sft['epochs']} epochs), "
                          f"final loss {sft['final_loss']}.",
                      "", "| seconds | step | held-out found@0.5 | mean IoU |", "|---:|---:|---:|---:|"]
            for e in sft.get("eval_curve", []):
                lines.append(f"| {e['seconds']} | {e['step']} | {e['found_share']:.1%} | {e['mean_iou']:.3f} |")
        grpo = gpu.get("grpo") or {}
        if grpo.get("reward_curve"):
            curve = grpo["reward_curve"]
            step = max(1, len(curve) // 12)
            lines += ["", f"GRPO (TRL, {grpo['config']['generations']} rollouts per prompt at temperature "
                          f"{grpo['config']['temperature']}, lr {grpo['config']['lr']}): {grpo['steps']} steps, "
                          f"{grpo['prompts']} prompts in {grpo['wall_seconds']} s.", "",
                      "| step | mean reward | reward std |", "|---:|---:|---:|"]
            for c in curve[::step] + ([curve[-1]] if (len(curve) - 1) % step else []):
                lines.append(f"| {c['step']} | {c['reward']:.3f} | {c['reward_std']:.3f} |")
        elif grpo:
            lines += ["", f"GRPO: {grpo.get('skipped', 'no steps')}"]
        if gpu.get("phases"):
            lines += ["", "Phases (s): " + ", ".join(f"{k} {v}" for k, v in gpu["phases"].items())]
    if r["samples"]:
        lines += ["", "## The bundled samples (the demo's pictures)", "", "| model | found@0.5 | mean IoU | boxes |",
                  "|---|---:|---:|---:|"]
        for name, m in r["samples"].items():
            lines.append(f"| {name} | {m['found']}/{m['objects']} | {m['mean_iou']:.3f} | {m['predicted_boxes']} |")
    if r["stages"]:
        lines += ["", "## Stages", "", "| stage | seconds | notes |", "|---|---:|---|"]
        for name, st in r["stages"].items():
            notes = ", ".join(f"{k} {v}" for k, v in st.items() if k not in ("finished", "seconds", "summary"))
            if "summary" in st:
                x = st["summary"]
                sft = x.get("datasets", {}).get("sft", {})
                notes = (f"{x.get('samples')} samples (SFT {sft.get('train')} train / {sft.get('val')} val), "
                         f"v0 boxes accepted {x.get('acceptance_rate', 0):.0%}, mean IoU of moved boxes "
                         f"{x.get('mean_iou')}")
            lines.append(f"| {name} | {st.get('seconds', '')} | {notes} |")
    return "\n".join(lines) + "\n"


def _num(n) -> str:
    return f"{n / 1e6:.1f} M parameters" if isinstance(n, (int, float)) else "parameters: after the GPU call"
