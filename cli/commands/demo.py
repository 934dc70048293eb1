"""``egm-assist demo``: the whole main path on built-in defaults, nothing to configure.

Starts what is missing (a private redis-server when REDIS_URL is unset, a model
when MODEL_DIR is unset: the shapes model trained by the closed loop when it is
bundled in ``egm/samples/model``, else the tiny random model), a worker and the ML
backend, sends the bundled sample images through ``POST /predict`` exactly as Label
Studio would, and writes a Label Studio import file with the predictions.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

import egm
from egm import processes

SAMPLES = Path(egm.__file__).resolve().parent / "samples"
#: the shapes model of the closed loop (bench/loop.py ship), with the settings it was trained for
SHAPES_MODEL = SAMPLES / "model"
DEMO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="circle" background="#e6194b"/>
    <Label value="square" background="#4363d8"/>
    <Label value="triangle" background="#3cb44b"/>
  </RectangleLabels>
  <TextArea name="reasoning" toName="image" perRegion="true" editable="true" displayMode="region-list"/>
  <TextArea name="image_reasoning" toName="image" editable="true" rows="3" maxSubmissions="1"/>
</View>"""
TINY_WARNING = """
  NOTE: no EGM weights configured (MODEL_DIR unset), so this demo ran a tiny random-weight
  Qwen3-VL built locally and taught only EGM's answer FORMAT (one fixed box for every image).
  Its reasoning and boxes are MEANINGLESS; the run shows the plumbing (queue, worker,
  transformers engine, parser, confidence, Label Studio format) works end to end.
  To use EGM:  MODEL_DIR=/path/to/EGM-4B egm-assist demo   (or EGM_MODEL_ID=nvidia/EGM-4B
  where the hub is reachable; GPU recommended: EGM_DEVICE=cuda).
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="pre-annotate the bundled sample images end to end (no setup needed)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--images", type=Path, default=SAMPLES, help="folder of images (default: bundled samples)")
    p.add_argument("--engine", choices=["hf", "scripted", "openai", "vllm"], default=None,
                   help="engine (default EGM_ENGINE or hf)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for all predictions")
    p.set_defaults(func=run)


def _images(folder: Path) -> list[Path]:
    from egm.bulk.sources import IMAGE_EXTENSIONS

    return sorted(p.resolve() for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _tiny_model_dir() -> Path:
    from egm.worker.tiny_model import ensure_tiny_checkpoint

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egm-assist"
    print(f"using the tiny model in {cache} (built on first use, ~20 s) ...", flush=True)
    return ensure_tiny_checkpoint(cache)


def _wait_for_worker(env: dict[str, str], name: str, proc, log_path: Path) -> str:
    """The model_version our worker serves once it is ready; raises with its reason when it dies first."""
    from egm.cli.drive import check_alive
    from egm.config.settings import Settings
    from egm.fleet import Fleet
    from egm.queue import connect

    settings = Settings(REDIS_URL=env["REDIS_URL"], EGM_QUEUE_PREFIX=env["EGM_QUEUE_PREFIX"])
    fleet = Fleet.from_settings(settings, connect(settings))
    ours = lambda view: [w.model_version for w in view.ready if w.worker == name]  # noqa: E731
    view = fleet.wait_for_ready(settings.worker_wait_s, start_timeout_s=settings.worker_start_timeout_s,
                                poll_s=0.2, check=lambda v: check_alive(name, proc, log_path, v), accept=ours)
    return ours(view)[0]


def run(args) -> int:
    images = _images(args.images)
    if not images:
        print(f"error: no images in {args.images}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="egm-demo-"))
    env = {"EGM_LOCAL_FILES_ROOT": str(args.images.resolve()), "EGM_QUEUE_PREFIX": f"demo{os.getpid()}",
           "EGM_LOG_FORMAT": "json", "EGM_PREDICT_BUDGET_S": str(args.timeout), "EGM_BATCH_SIZE": "4"}
    engine = args.engine or os.environ.get("EGM_ENGINE", "hf")
    env["EGM_ENGINE"] = engine
    tiny = engine == "hf" and not os.environ.get("MODEL_DIR")
    if tiny and (SHAPES_MODEL / "egm_model.json").is_file():
        tiny = False
        meta = json.loads((SHAPES_MODEL / "egm_model.json").read_text())
        print(f"using the bundled shapes model ({meta.get('about', SHAPES_MODEL)})", flush=True)
        env["MODEL_DIR"] = str(SHAPES_MODEL)
        env.update({k: str(v) for k, v in meta.get("settings", {}).items() if k not in os.environ})
        env.setdefault("EGM_DEVICE", os.environ.get("EGM_DEVICE", "cpu"))
    elif tiny:
        env["MODEL_DIR"] = str(_tiny_model_dir())
        env["EGM_MAX_NEW_TOKENS"] = os.environ.get("EGM_MAX_NEW_TOKENS", "128")
        env["EGM_DEVICE"] = os.environ.get("EGM_DEVICE", "cpu")

    procs = []
    try:
        if os.environ.get("REDIS_URL"):
            env["REDIS_URL"] = os.environ["REDIS_URL"]
        else:
            redis_proc, env["REDIS_URL"] = processes.start_redis(workdir / "redis")
            procs.append(redis_proc)
            print(f"started a private redis-server at {env['REDIS_URL']}", flush=True)
        port = processes.free_port()
        env["EGM_PORT"], env["EGM_HOST"] = str(port), "127.0.0.1"
        worker_name = f"demo-{os.getpid()}"
        worker = processes.spawn(["worker", "--name", worker_name], env, args.out / "worker.log")
        procs.append(worker)
        backend = processes.spawn(["serve"], env, args.out / "backend.log")
        procs.append(backend)
        base = f"http://127.0.0.1:{port}"
        processes.wait_http(f"{base}/health", 60, backend)
        print(f"backend up at {base}; worker loading the model ...", flush=True)
        try:
            model_version = _wait_for_worker(env, worker_name, worker, args.out / "worker.log")
        except Exception as exc:  # noqa: BLE001 - the worker died or never came: its reason, one line
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"worker ready: model_version {model_version}", flush=True)

        tasks = [{"id": i + 1, "data": {"image": str(p)}} for i, p in enumerate(images)]
        started = time.time()
        resp = httpx.post(f"{base}/predict", timeout=args.timeout + 30, json={
            "tasks": tasks, "project": "1.0", "label_config": DEMO_CONFIG, "params": {"context": None}})
        if resp.status_code != 200:
            print(f"error: /predict answered {resp.status_code}: {resp.text[:500]}", file=sys.stderr)
            return 1
        results = resp.json()["results"]
        elapsed = time.time() - started
    finally:
        for proc in reversed(procs):
            processes.stop(proc)

    export = []
    print(f"\n{'image':28} {'boxes':>5} {'score':>6}  labels")
    for path, task, res in zip(images, tasks, results):
        entry = {"data": task["data"]}
        if isinstance(res, dict):
            entry["predictions"] = [res]
            rects = [r for r in res["result"] if r["type"] == "rectanglelabels"]
            labels = ", ".join(sorted({r["value"]["rectanglelabels"][0] for r in rects})) or "-"
            score = f"{res['score']:.3f}" if res.get("score") is not None else "-"
            print(f"{path.name:28} {len(rects):>5} {score:>6}  {labels}")
        else:
            print(f"{path.name:28} {'-':>5} {'-':>6}  no prediction (no parseable box; see {args.out}/worker.log)")
        export.append(entry)
    out_file = args.out / "label_studio_import.json"
    out_file.write_text(json.dumps(export, indent=2))
    n_pred = sum(isinstance(r, dict) for r in results)
    print(f"\n{n_pred}/{len(images)} images got predictions in {elapsed:.1f} s; "
          f"Label Studio import file: {out_file}")
    if tiny:
        print(TINY_WARNING)
    return 0
