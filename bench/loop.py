"""The loop, closed: pre-annotate -> correct -> export -> fine-tune -> serve the new model -> measure.

Synthetic shape scenes (egm/scenes.py) with a held-out split; model v0 is the tiny Qwen3-VL
(worker/tiny_model.py), random weights taught only EGM's answer format (one fixed box), and
v1 is the ``small`` size trained from random weights on what the annotators made of v0's
boxes. On the CPU: v0 pre-annotates both splits through the real pipeline (prelabel -> Redis -> worker ->
transformers engine -> Label Studio), the scenes' true boxes are written through Label
Studio's API as an annotator's corrections of v0's predictions (train split only), and
``egm-assist export`` writes the training data. On the GPU, one call: SFT on the exported
JSONL with transformers' Trainer, then a short GRPO phase on the exported parquet with the
exported reward (TRL), held-out figures after each. Back on the CPU: v1 pre-annotates the
held-out split through the pipeline again under its own model_version, and the report
compares v0 and v1 on the held-out scenes. docs/loop.md is the guide.

    python3 bench/loop.py cpu-before [--train 4000 --heldout 400]   # CPU: scenes .. export
    python3 bench/loop.py train --out $OUT                           # the GPU call
    python3 bench/loop.py cpu-after --gpu-out DIR                    # CPU: serve v1, report

Each stage is a subcommand too (prepare, prelabel, annotate, export, gpu-command, unpack,
evaluate, report, ship) and can be run again: it resumes or redoes only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rooms import REPO, map_rooms  # noqa: E402

map_rooms()

from closed_loop.workspace import DEFAULT_ROOT, Workspace  # noqa: E402

SHAPES_CONFIG = REPO / "config" / "labeling" / "shapes.xml"
HELDOUT_SEED_BASE = 1_000_000
#: v0, the pre-annotator at the start (fast enough on a CPU for thousands of images), and the size trained
V0_SIZE, TRAINED_SIZE = "tiny", "small"
#: EGM's SFT image budget (REFERENCE.md 1): 224 x 224 pixels, about 49 visual tokens
PIXELS = 50176


# --------------------------------------------------------------------------- helpers

def _settings_env(ws: Workspace, model: str, manifest: dict, files_root: Path | None = None) -> dict[str, str]:
    """The environment of every egm-assist command and worker the loop starts for ``model``.

    ``files_root``: Label Studio's local-files root, where the scenes are (default: the loop's folder).
    """
    budget = manifest["budget"]
    return {"MODEL_DIR": str(ws.model(model)), "EGM_ENGINE": "hf", "EGM_DEVICE": "cpu",
            "EGM_MAX_PIXELS": str(budget["max_pixels"]), "EGM_MIN_PIXELS": str(budget["min_pixels"]),
            "EGM_MAX_NEW_TOKENS": str(budget["max_new_tokens"]), "EGM_PROMPT_MODE": manifest["prompt_mode"],
            "EGM_LOCAL_FILES_ROOT": str(files_root or ws.root), "EGM_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}


def _settings(env: dict[str, str]):
    """Settings as a process with ``env`` would read them (egm.config.settings is the one reader)."""
    from egm.config.settings import Settings

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prediction_ids(ls, project_id: int) -> set[int]:
    with ls.client() as client:
        return {p.id for p in client.list_predictions(project_id=project_id)}


def _run_versions(redis_url: str, prefix: str) -> dict[str, str]:
    """Every bulk run the store knows, with the model_version it was planned for."""
    import redis

    from egm.bulk.run_store import RunStore

    store = RunStore(redis.Redis.from_url(redis_url), prefix)
    return {run: p.model_version for run in store.runs() if (p := store.progress(run)) and p.model_version}


def _served_version(ls, project_id: int, predictions_before: set[int], runs_after: dict[str, str],
                    runs_before: dict[str, str]) -> str | None:
    """The model_version a prelabel stage ran under. The worker owns its identity (issue 11), so the
    loop reads it off what the stage left: the predictions it wrote, else (a model whose every answer
    failed to parse writes none) the run it planned, which the live worker's version names."""
    with ls.client() as client:
        fresh = [p for p in client.list_predictions(project_id=project_id) if p.id not in predictions_before]
    versions = {p.model_version for p in fresh if p.model_version}
    if not versions:
        versions = {v for run, v in runs_after.items() if run not in runs_before}
    if len(versions) > 1:
        raise RuntimeError(f"one prelabel stage ran under several model versions: {sorted(versions)}")
    return versions.pop() if versions else None


def _stage_done(ws: Workspace, name: str, **result) -> None:
    ws.state.setdefault("stages", {})[name] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    ws.save_state()


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- stages (CPU)

def cmd_prepare(ws: Workspace, args) -> int:
    """Scenes of both splits, the manifest, and model v0."""
    from egm.labelstudio.config import parse_labeling_config
    from egm.prompts import load_templates
    from egm.scenes import read_scenes, write_scenes
    from egm.worker.tiny_model import build_tiny_checkpoint

    started = time.time()
    splits = {"train": range(args.first_seed, args.first_seed + args.train),
              "heldout": range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + args.heldout)}
    for split, seeds in splits.items():
        folder = ws.scenes(split)
        if (folder / "scenes.jsonl").is_file() and [s.seed for s in read_scenes(folder)] == list(seeds):
            print(f"scenes/{split}: {len(seeds)} scenes already there")
            continue
        scenes = write_scenes(folder, seeds)
        print(f"scenes/{split}: wrote {len(scenes)} scenes, {sum(len(s.objects) for s in scenes)} objects")
    config = parse_labeling_config(SHAPES_CONFIG.read_text())
    budget = {"min_pixels": args.pixels, "max_pixels": args.pixels, "max_new_tokens": args.max_new_tokens}
    env = {"EGM_MAX_PIXELS": str(args.pixels), "EGM_MIN_PIXELS": str(args.pixels)}
    templates = load_templates(_settings(env))
    manifest = {
        "version": 1, "v0_size": V0_SIZE, "model_size": args.trained_size, "budget": budget,
        "prompt_mode": args.prompt_mode, "seed": args.first_seed,
        "labeling_config": SHAPES_CONFIG.read_text(), "target": config.target.model_dump(),
        "templates": {"referring": templates.referring, "multi": templates.multi},
        "scenes": {split: {"first_seed": seeds.start, "count": len(seeds)} for split, seeds in splits.items()},
    }
    ws.write_manifest(manifest)
    v0 = ws.model("v0")
    if not (v0 / "model.safetensors").is_file():
        print(f"building v0 ({V0_SIZE}, random weights taught EGM's answer format) ...", flush=True)
        build_tiny_checkpoint(v0, size=V0_SIZE, teach_steps=args.teach_steps)
    _stage_done(ws, "prepare", seconds=round(time.time() - started, 1))
    print(f"prepared {ws.root} in {time.time() - started:.0f} s")
    return 0


def _project(ws: Workspace, stack, split: str, manifest: dict) -> int:
    """The Label Studio project of ``split``, created with its tasks on first use."""
    projects = ws.state.setdefault("projects", {})
    if split in projects:
        return int(projects[split])
    from egm.scenes import read_scenes, scene_file

    ls = stack.label_studio()
    pid = ls.create_project(manifest["labeling_config"], title=f"egm loop {split}")
    folder = ws.scenes(split)
    rel = folder.relative_to(ls.local_files_root)
    ls.call("POST", "/api/storages/localfiles/", json={"project": pid, "path": str(folder), "title": split,
                                                       "use_blob_urls": True})
    scenes = read_scenes(folder)
    for start in range(0, len(scenes), 500):
        ls.import_tasks(pid, [{"image": f"/data/local-files/?d={rel}/{scene_file(s.seed)}", "scene": s.seed}
                              for s in scenes[start:start + 500]])
    projects[split] = pid
    ws.save_state()
    print(f"Label Studio project {pid} ({split}): {len(scenes)} tasks")
    return pid


def cmd_prelabel(ws: Workspace, args, stack=None) -> int:
    """Pre-annotate a split's project with a model, through egm-assist prelabel and a local worker."""
    from closed_loop.stack import Stack
    from egm.cli.drive import EXIT_FAILED_TASKS

    manifest = ws.manifest()
    if not (ws.model(args.model) / "config.json").is_file():
        print(f"error: no model at {ws.model(args.model)}", file=sys.stderr)
        return 2
    own = stack is None
    stack = stack or Stack(ws)
    try:
        ls = stack.label_studio()
        code = 0
        for split in args.split:
            pid = _project(ws, stack, split, manifest)
            before = _prediction_ids(ls, pid)
            env = {**_settings_env(ws, args.model, manifest, ls.local_files_root), "REDIS_URL": stack.redis(),
                   "EGM_QUEUE_PREFIX": f"loop{os.getpid()}", "LABEL_STUDIO_URL": ls.url,
                   "LABEL_STUDIO_API_KEY": ls.token, "EGM_BATCH_SIZE": str(args.engine_batch),
                   "EGM_BULK_BATCH_SIZE": str(args.job_size)}
            runs_before = _run_versions(env["REDIS_URL"], env["EGM_QUEUE_PREFIX"])
            log = ws.logs / f"prelabel-{args.model}-{split}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"pre-annotating {split} (project {pid}) with {args.model}; log {log}", flush=True)
            started = time.time()
            cmd = [sys.executable, "-m", "egm.cli", "prelabel", "--project", str(pid), "--local-workers", "1"]
            with open(log, "ab") as out:
                result = subprocess.run(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
            seconds = time.time() - started
            tail = log.read_text(errors="replace").splitlines()[-3:]
            print("\n".join("  " + line for line in tail))
            # 3: done, some tasks failed - for a model that writes no parseable box, that is its answer
            if result.returncode not in (0, EXIT_FAILED_TASKS):
                print(f"error: prelabel exited with {result.returncode}; run the same command again to resume "
                      f"(see {log})", file=sys.stderr)
                code = result.returncode
                continue
            version = _served_version(ls, pid, before, _run_versions(env["REDIS_URL"], env["EGM_QUEUE_PREFIX"]),
                                      runs_before) or ws.state.get("versions", {}).get(args.model)
            if version is None:
                print(f"error: {args.model} wrote no prediction in project {pid} (see {log})", file=sys.stderr)
                code = 1
                continue
            print(f"  {args.model} served as {version}")
            ws.state.setdefault("versions", {})[args.model] = version
            _stage_done(ws, f"prelabel-{args.model}-{split}", seconds=round(seconds, 1), model_version=version,
                        project=pid, failed_tasks=result.returncode == EXIT_FAILED_TASKS)
        return code
    finally:
        if own:
            stack.close()


def cmd_annotate(ws: Workspace, args, stack=None) -> int:
    """The train scenes' true boxes, written as corrections of v0's predictions."""
    from closed_loop.annotator import correct, predicted_regions
    from closed_loop.stack import Stack
    from egm.contract import LabelTarget
    from egm.scenes import read_scenes

    manifest = ws.manifest()
    target = LabelTarget(**manifest["target"])
    version = ws.state.get("versions", {}).get(args.model)
    pid = ws.state.get("projects", {}).get("train")
    if not version or not pid:
        print(f"error: pre-annotate the train split with {args.model} first (bench/loop.py prelabel)", file=sys.stderr)
        return 2
    scenes = {s.seed: s for s in read_scenes(ws.scenes("train"))}
    own = stack is None
    stack = stack or Stack(ws)
    try:
        ls = stack.label_studio()
        client = ls.client()
        predictions = {p.task: p for p in client.list_predictions(project_id=pid) if p.model_version == version}
        totals = {"annotated": 0, "already": 0, "no_prediction": 0, "kept": 0, "drawn": 0, "deleted": 0}
        started = time.time()
        for task in client.iter_tasks(pid):
            if task.total_annotations:
                totals["already"] += 1
                continue
            scene = scenes[int(task.data["scene"])]
            prediction = predictions.get(task.id)
            predicted = predicted_regions(prediction.result, target) if prediction else []
            fix = correct(scene, predicted, target)
            if prediction is None:
                totals["no_prediction"] += 1
            client.create_annotation(task.id, fix.result, lead_time_s=5.0 + 2.0 * (fix.drawn + fix.deleted),
                                     parent_prediction=prediction.id if prediction is not None else None)
            totals["annotated"] += 1
            for key in ("kept", "drawn", "deleted"):
                totals[key] += getattr(fix, key)
        print(_table([[k, v] for k, v in totals.items()], ["annotations", "count"]))
        _stage_done(ws, "annotate", seconds=round(time.time() - started, 1), **totals)
        return 0
    finally:
        if own:
            stack.close()


def cmd_export(ws: Workspace, args, stack=None) -> int:
    """egm-assist export of the train project into the loop's export folder."""
    from closed_loop.stack import Stack

    pid = ws.state.get("projects", {}).get("train")
    if not pid:
        print("error: no train project yet", file=sys.stderr)
        return 2
    own = stack is None
    stack = stack or Stack(ws)
    try:
        ls = stack.label_studio()
        env = {**_settings_env(ws, "v0", ws.manifest(), ls.local_files_root), "LABEL_STUDIO_URL": ls.url,
               "LABEL_STUDIO_API_KEY": ls.token}
        started = time.time()
        cmd = [sys.executable, "-m", "egm.cli", "export", "--project", str(pid), "--out", str(ws.export),
               "--format", "all"]
        result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
            return result.returncode
        summary = json.loads(result.stdout)
        print(json.dumps(summary, indent=2))
        _stage_done(ws, "export", seconds=round(time.time() - started, 1), summary=summary)
        return 0
    finally:
        if own:
            stack.close()


def cmd_gpu_command(ws: Workspace, args) -> int:
    """Print the GPU call: the command and its carry list."""
    sizes = {p: _size(REPO_ROOT_OF(ws) / p) for p in ws.carry() + list(GPU_DEPS)}
    missing = [p for p in GPU_DEPS if not (REPO_ROOT_OF(ws) / p).is_dir()]
    print("carry:", json.dumps(list(sizes)))
    print(_table([[p, f"{s / 1e6:.1f} MB"] for p, s in sizes.items()], ["path", "size"]))
    print(f"total {sum(sizes.values()) / 1e6:.1f} MB of the 64 MiB a call carries")
    if missing:
        print(f"note: {', '.join(missing)} missing here: `make gpu-deps` builds them (bench/gpu_deps)")
    print("command:", gpu_command(ws))
    return 0


def REPO_ROOT_OF(ws: Workspace) -> Path:  # noqa: N802 - reads like a path constant
    return ws.root.parent


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


#: what the GPU image lacks, as `make gpu-deps` builds it (bench/gpu_deps): pydantic & co., TRL + datasets
GPU_DEPS = (".gpu/base", ".gpu/trl")


def gpu_command(ws: Workspace) -> str:
    return ("bash bench/gpu_deps/install.sh && . /tmp/egm-gpu/env.sh && "
            f"python3 bench/loop.py --dir {ws.root.name} train --out $OUT")


def cmd_unpack(ws: Workspace, args) -> int:
    """The GPU call's output -> models/v1, models/v1-grpo and the GPU figures in the state."""
    import tarfile

    src = Path(args.gpu_out or ws.gpu_out)
    figures = src / "loop-gpu.json"
    if not figures.is_file():
        print(f"error: {figures} is missing: copy the GPU call's files into {ws.gpu_out}", file=sys.stderr)
        return 2
    for name in ("v1", "v1-grpo"):
        tar = src / f"{name}.tar"
        if tar.is_file():
            target = ws.model(name)
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(tar) as handle:
                handle.extractall(target, filter="data")
            print(f"{tar} -> {target}")
    ws.state["gpu"] = json.loads(figures.read_text())
    _stage_done(ws, "unpack")
    return 0


def cmd_evaluate(ws: Workspace, args, stack=None) -> int:
    """Held-out figures of each model from its predictions in Label Studio (what the pipeline wrote)."""
    from closed_loop.stack import Stack
    from egm.contract import LabelTarget
    from egm.export.regions import parse_result
    from egm.scenes import read_scenes, score

    manifest = ws.manifest()
    target = LabelTarget(**manifest["target"])
    pid = ws.state.get("projects", {}).get("heldout")
    scenes = {s.seed: s for s in read_scenes(ws.scenes("heldout"))}
    own = stack is None
    stack = stack or Stack(ws)
    try:
        client = stack.label_studio().client()
        seeds = {t.id: int(t.data["scene"]) for t in client.iter_tasks(pid)}
        predictions = client.list_predictions(project_id=pid)
        rows = []
        for model in args.models:
            version = ws.state.get("versions", {}).get(model)
            if not version:
                continue
            found: dict[int, list] = {seed: [] for seed in seeds.values()}
            for p in predictions:
                if p.model_version == version and p.task in seeds:
                    regions = parse_result(p.result, from_name=target.from_name).regions
                    found[seeds[p.task]] += [(r.label, r.grid) for r in regions]
            result = score((scenes[seed], boxes) for seed, boxes in found.items()).to_json()
            result.update(model_version=version, predictions=sum(p.model_version == version for p in predictions))
            ws.state.setdefault("heldout", {})[model] = result
            rows.append([model, version, result["objects"], f"{result['found_share']:.1%}",
                         f"{result['mean_iou']:.3f}", f"{result['precision']:.1%}"])
        ws.save_state()
        print(_table(rows, ["model", "model_version", "objects", "found@0.5", "mean IoU", "precision"]))
        return 0
    finally:
        if own:
            stack.close()


def cmd_report(ws: Workspace, args) -> int:
    from closed_loop.report import write_report

    paths = write_report(ws, machine=args.machine, out_dir=Path(args.results))
    print("\n".join(str(p) for p in paths))
    return 0


def cmd_cpu_before(ws: Workspace, args) -> int:
    from closed_loop.stack import Stack

    if cmd_prepare(ws, args):
        return 1
    with Stack(ws) as stack:
        args.model, args.split = "v0", ["heldout", "train"]
        if cmd_prelabel(ws, args, stack) or cmd_annotate(ws, args, stack) or cmd_export(ws, args, stack):
            return 1
    return cmd_gpu_command(ws, args)


def cmd_cpu_after(ws: Workspace, args) -> int:
    from closed_loop.stack import Stack

    if cmd_unpack(ws, args):
        return 1
    with Stack(ws) as stack:
        for model in ("v1", "v1-grpo"):
            if (ws.model(model) / "config.json").is_file():
                args.model, args.split = model, ["heldout"]
                if cmd_prelabel(ws, args, stack):
                    return 1
        args.models = ["v0", "v1", "v1-grpo"]
        if cmd_evaluate(ws, args, stack):
            return 1
    from closed_loop.report import samples_check

    for model in ("v1", "v1-grpo"):
        if (ws.model(model) / "config.json").is_file():
            ws.state.setdefault("samples", {})[model] = samples_check(ws, model)
    ws.save_state()
    return cmd_report(ws, args)


def cmd_ship(ws: Workspace, args) -> int:
    """Bundle a trained model as the demo's model (egm/samples/model) if it finds the samples' shapes."""
    import shutil

    from closed_loop.report import samples_check

    folder = ws.model(args.model)
    if not (folder / "model.safetensors").is_file():
        print(f"error: no model at {folder}", file=sys.stderr)
        return 2
    check = samples_check(ws, args.model)
    print(f"{args.model} on the bundled samples: found {check['found']}/{check['objects']} at IoU >= 0.5, "
          f"mean IoU {check['mean_iou']:.3f}, {check['predicted_boxes']} boxes")
    if check["found"] < check["objects"] and not args.force:
        print("not shipped: it misses shapes of the demo's pictures (--force ships it anyway)", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if size > 20e6:
        print(f"not shipped: {size / 1e6:.1f} MB is over the 20 MB a bundled model may take", file=sys.stderr)
        return 1
    target = REPO / "egm" / "samples" / "model"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file() and f.suffix in {".json", ".safetensors", ".jinja"} and f.name != "egm_tiny_model.json":
            shutil.copy2(f, target / f.name)
    manifest, heldout = ws.manifest(), ws.state.get("heldout", {}).get(args.model, {})
    budget = manifest["budget"]
    meta = {"about": f"the closed loop's {args.model} ({manifest['model_size']} Qwen3-VL trained on exported "
                     f"corrections of synthetic shape scenes; docs/loop.md), {time.strftime('%Y-%m-%d')}",
            "settings": {"EGM_MAX_PIXELS": budget["max_pixels"], "EGM_MIN_PIXELS": budget["min_pixels"],
                         "EGM_MAX_NEW_TOKENS": budget["max_new_tokens"], "EGM_PROMPT_MODE": manifest["prompt_mode"]},
            "heldout": {k: heldout.get(k) for k in ("found_share", "mean_iou", "precision", "objects")},
            "samples": {k: check[k] for k in ("found", "objects", "mean_iou")}}
    (target / "egm_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"shipped {folder} -> {target} ({size / 1e6:.1f} MB); `egm-assist demo` uses it now")
    return 0


def cmd_train(ws: Workspace, args) -> int:
    from closed_loop.gpu_stage import run_gpu_stage

    return run_gpu_stage(ws, Path(args.out), args)


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=DEFAULT_ROOT, help="the loop's folder (default .loop)")
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, func, help_):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(func=func)
        return sp

    def prepare_args(sp):
        sp.add_argument("--train", type=int, default=2000, help="train scenes (2000)")
        sp.add_argument("--heldout", type=int, default=200, help="held-out scenes (200)")
        sp.add_argument("--first-seed", type=int, default=0)
        sp.add_argument("--pixels", type=int, default=PIXELS, help=f"image budget in pixels ({PIXELS})")
        sp.add_argument("--max-new-tokens", type=int, default=192)
        sp.add_argument("--prompt-mode", choices=["multi", "per_label"], default="multi")
        sp.add_argument("--teach-steps", type=int, default=240, help="steps teaching v0 EGM's answer format")
        sp.add_argument("--trained-size", default=TRAINED_SIZE, help=f"size the GPU call trains ({TRAINED_SIZE})")

    def pipeline_args(sp):
        sp.add_argument("--engine-batch", type=int, default=16, help="EGM_BATCH_SIZE of the worker (16)")
        sp.add_argument("--job-size", type=int, default=64, help="EGM_BULK_BATCH_SIZE (64)")

    prepare_args(stage("prepare", cmd_prepare, "scenes, manifest and model v0"))
    sp = stage("prelabel", cmd_prelabel, "pre-annotate a split with a model through the pipeline")
    sp.add_argument("--model", default="v0")
    sp.add_argument("--split", action="append", choices=["train", "heldout"], help="(repeatable; default both)")
    pipeline_args(sp)
    sp = stage("annotate", cmd_annotate, "write the train scenes' true boxes as corrections")
    sp.add_argument("--model", default="v0", help="the model whose predictions the annotator corrects")
    stage("export", cmd_export, "egm-assist export of the train project")
    stage("gpu-command", cmd_gpu_command, "print the GPU call and its carry list")
    sp = stage("train", cmd_train, "the GPU call: SFT, GRPO, held-out figures, v1 checkpoints in --out")
    sp.add_argument("--out", required=True)
    sp.add_argument("--deadline", type=float, default=540, help="seconds the whole call may take (540)")
    sp.add_argument("--sft-seconds", type=float, default=270)
    sp.add_argument("--grpo-seconds", type=float, default=75)
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--grpo-lr", type=float, default=3e-5)
    sp.add_argument("--no-multi-rows", action="store_true", help="train on the export's per-label rows only")
    sp.add_argument("--augment", default="mirror,channels",
                    help="picture variants trained on besides the rows: mirror, channels, both (default) or none")
    sp.add_argument("--init", help="start from this checkpoint folder instead of models/v0 (a second call)")
    sp.add_argument("--tiny", action="store_true", help="CPU smoke test: a few steps, few scenes")
    sp = stage("unpack", cmd_unpack, "unpack the GPU call's output into models/")
    sp.add_argument("--gpu-out", help="folder with the GPU call's files (default .loop/gpu-out)")
    sp = stage("ship", cmd_ship, "bundle a trained model as the demo's model if it finds the samples' shapes")
    sp.add_argument("--model", default="v1")
    sp.add_argument("--force", action="store_true")
    sp = stage("evaluate", cmd_evaluate, "held-out figures from the predictions in Label Studio")
    sp.add_argument("--models", nargs="+", default=["v0", "v1", "v1-grpo"])

    def report_args(sp):
        sp.add_argument("--machine", default=f"cpu{os.cpu_count()}-{platform.machine()}")
        sp.add_argument("--results", default=str(REPO / "bench" / "results"))

    report_args(stage("report", cmd_report, "write bench/results/loop-<machine>.{json,md}"))
    sp = stage("cpu-before", cmd_cpu_before, "prepare + prelabel v0 + annotate + export (CPU)")
    prepare_args(sp)
    pipeline_args(sp)
    sp = stage("cpu-after", cmd_cpu_after, "unpack + prelabel v1 + evaluate + report (CPU)")
    sp.add_argument("--gpu-out")
    pipeline_args(sp)
    report_args(sp)

    args = p.parse_args(argv)
    if getattr(args, "split", None) is None and args.command == "prelabel":
        args.split = ["heldout", "train"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(Workspace(args.dir), args)


if __name__ == "__main__":
    sys.exit(main())
