"""``egm-assist demo``: the whole main path on built-in defaults, nothing to configure.

Starts what is missing (a private redis-server when REDIS_URL is unset, a model
when MODEL_DIR is unset: the shapes model trained by the closed loop when it is
bundled in ``egm/samples/model``, else the tiny random model), a worker and the ML
backend, sends the bundled sample images through ``POST /predict`` exactly as Label
Studio would, and writes a Label Studio import file with the predictions.

The import file is importable as it stands: each task's image is a Label Studio local-files URL
(``/data/local-files/?d=<folder>/<file>``, relative to the images folder's parent, which is also
the workers' ``EGM_LOCAL_FILES_ROOT`` during the demo), and the labeling config its predictions
match is written beside it (``labeling_config.xml``); the demo prints the Label Studio settings
that serve those files. ``--image-url-prefix`` writes other URLs (a web server's, say).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import httpx

import egm
from egm import processes
from egm.cli.errors import EXIT_USAGE, fail
from egm.config.settings import Settings, get_settings
from egm.fleet import FleetError
from egm.redaction import redact

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
    p.add_argument("--image-url-prefix", default=None,
                   help="put before each image file name in the import file (default: a Label Studio "
                        "local-files URL, /data/local-files/?d=<images folder name>/)")
    p.set_defaults(func=run)


def _images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``; ValueError (one line) when there are none."""
    from egm.bulk.sources import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such folder")
    found = sorted(p.resolve() for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise ValueError(f"--images {folder}: no images in it ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _tiny_model_dir(settings: Settings) -> Path:
    from egm.cli.commands._common import step_printer
    from egm.worker.tiny_model import ensure_tiny_checkpoint, tiny_checkpoint_cached

    cache = Path(settings.state_dir).expanduser()
    if tiny_checkpoint_cached(cache):
        print(f"using the tiny model in {cache}", flush=True)
        return ensure_tiny_checkpoint(cache)
    print(f"building the tiny model in {cache} (first run only: 240 training steps on the CPU, one to two "
          f"minutes on a free machine, up to ten on a busy one; progress below) ...", flush=True)
    return ensure_tiny_checkpoint(cache, progress=step_printer("training step"))


def image_url(path: Path, root: Path, prefix: str | None) -> str:
    """What the import file (and /predict) calls ``path``: a local-files URL relative to ``root``."""
    from urllib.parse import quote

    if prefix is not None:
        return prefix + quote(path.name)
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix())


def label_studio_hint(out_dir: Path, root: Path, folder: Path) -> str:
    """How to import the demo's file into Label Studio (also in the README)."""
    return ("To see the predictions in Label Studio:\n"
            f"  1. start it: LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} label-studio start\n"
            f"  2. create a project with the labeling config {out_dir / 'labeling_config.xml'}\n"
            f"  3. Settings > Cloud Storage > Add Source Storage > Local files, absolute path {folder} "
            f"(save, do not sync)\n"
            f"  4. import {out_dir / 'label_studio_import.json'}")


def _wait_for_worker(env: dict[str, str], name: str, proc, log_path: Path) -> str:
    """The model_version our worker serves once it is ready; raises with its reason when it dies first."""
    from egm.cli.drive import check_alive
    from egm.fleet import Fleet
    from egm.queue import connect

    settings = Settings(REDIS_URL=env["REDIS_URL"], EGM_QUEUE_PREFIX=env["EGM_QUEUE_PREFIX"])
    fleet = Fleet.from_settings(settings, connect(settings))
    ours = lambda view: [w.model_version for w in view.ready if w.worker == name]  # noqa: E731
    said = [0.0]

    def still_loading(view, waited: float) -> None:
        if waited - said[0] >= 15:
            said[0] = waited
            print(f"  still loading the model ({waited:.0f} s; log: {log_path})", flush=True)

    view = fleet.wait_for_ready(settings.worker_wait_s, start_timeout_s=settings.worker_start_timeout_s,
                                poll_s=0.2, check=lambda v: check_alive(name, proc, log_path, v), accept=ours,
                                on_wait=still_loading)
    return ours(view)[0]


def _check_processes(worker_name: str, worker, worker_log: Path, backend, backend_log: Path) -> None:
    """Raise with the reason when the demo's worker or backend has exited."""
    from egm.cli.drive import check_alive, last_line

    check_alive(worker_name, worker, worker_log)
    if backend.poll() is not None:
        raise RuntimeError(f"the backend exited (code {backend.returncode}): "
                           f"{last_line(backend_log) or 'no output'} (log: {backend_log})")


def _predict(base: str, tasks: list[dict], timeout_s: float, check) -> httpx.Response:
    """``POST /predict`` as Label Studio would, while ``check()`` watches the processes every half second
    (a worker that dies mid-way ends the demo within seconds, not after the request's timeout)."""
    from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout

    body = {"tasks": tasks, "project": "1.0", "label_config": DEMO_CONFIG, "params": {"context": None}}
    pool = ThreadPoolExecutor(1, thread_name_prefix="egm-demo-predict")
    try:
        future = pool.submit(httpx.post, f"{base}/predict", timeout=timeout_s + 30, json=body)
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                check()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run(args) -> int:
    try:
        images = _images(args.images)
    except (ValueError, OSError) as exc:
        return fail(str(exc), EXIT_USAGE)
    folder = args.images.resolve()
    root = folder.parent
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"--out {args.out}: {exc.strerror}", EXIT_USAGE)
    workdir = Path(tempfile.mkdtemp(prefix="egm-demo-"))
    env = {"EGM_LOCAL_FILES_ROOT": str(root), "EGM_QUEUE_PREFIX": f"demo{os.getpid()}",
           "EGM_LOG_FORMAT": "json", "EGM_PREDICT_BUDGET_S": str(args.timeout), "EGM_BATCH_SIZE": "4"}
    settings = get_settings()  # the environment; what the demo changes goes to its processes only
    engine = args.engine or settings.engine
    env["EGM_ENGINE"] = engine
    tiny = engine == "hf" and not settings.model_dir
    if tiny and (SHAPES_MODEL / "egm_model.json").is_file():
        tiny = False
        meta = json.loads((SHAPES_MODEL / "egm_model.json").read_text())
        print(f"using the bundled shapes model ({meta.get('about', SHAPES_MODEL)})", flush=True)
        env["MODEL_DIR"] = str(SHAPES_MODEL)
        env.update({k: str(v) for k, v in meta.get("settings", {}).items() if not settings.is_set(k)})
        env.setdefault("EGM_DEVICE", settings.device if settings.is_set("EGM_DEVICE") else "cpu")
    elif tiny:
        env["MODEL_DIR"] = str(_tiny_model_dir(settings))
        env["EGM_MAX_NEW_TOKENS"] = str(settings.max_new_tokens) if settings.is_set("EGM_MAX_NEW_TOKENS") else "128"
        env["EGM_DEVICE"] = settings.device if settings.is_set("EGM_DEVICE") else "cpu"

    procs = []
    try:
        if settings.is_set("REDIS_URL"):
            env["REDIS_URL"] = settings.redis_url
            if not processes.redis_reachable(env["REDIS_URL"]):
                return fail(f"cannot reach Redis at {redact(env['REDIS_URL'])}; start it, or unset REDIS_URL "
                            f"and the demo starts its own")
        else:
            redis_proc, env["REDIS_URL"] = processes.start_redis(workdir / "redis")
            procs.append(redis_proc)
            print(f"started a private redis-server at {env['REDIS_URL']}", flush=True)
        port = processes.free_port()
        env["EGM_PORT"], env["EGM_HOST"] = str(port), "127.0.0.1"
        worker_name = f"demo-{os.getpid()}"
        worker_log = args.out / "worker.log"
        worker = processes.spawn(["worker", "--name", worker_name], env, worker_log)
        procs.append(worker)
        backend = processes.spawn(["serve"], env, args.out / "backend.log")
        procs.append(backend)
        base = f"http://127.0.0.1:{port}"
        processes.wait_http(f"{base}/health", 60, backend)
        print(f"backend up at {base}; worker loading the model ...", flush=True)
        model_version = _wait_for_worker(env, worker_name, worker, worker_log)
        print(f"worker ready: model_version {model_version}", flush=True)

        # exactly what Label Studio sends for files it serves from local storage
        tasks = [{"id": i + 1, "data": {"image": image_url(p, root, None)}} for i, p in enumerate(images)]
        started = time.time()
        resp = _predict(base, tasks, args.timeout, lambda: _check_processes(worker_name, worker, worker_log,
                                                                           backend, args.out / "backend.log"))
        if resp.status_code != 200:
            return fail(f"/predict answered {resp.status_code}: {resp.text[:500]}")
        results = resp.json()["results"]
        elapsed = time.time() - started
    except (RuntimeError, TimeoutError, FleetError, httpx.HTTPError) as exc:
        # redis-server missing, the backend or the worker died or never came: the reason, one line
        return fail(str(exc) or type(exc).__name__)
    finally:
        for proc in reversed(procs):
            processes.stop(proc)

    export = []
    print(f"\n{'image':28} {'boxes':>5} {'score':>6}  labels")
    for path, task, res in zip(images, tasks, results):
        entry = {"data": {"image": image_url(path, root, args.image_url_prefix)}}
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
    (args.out / "labeling_config.xml").write_text(DEMO_CONFIG + "\n")
    n_pred = sum(isinstance(r, dict) for r in results)
    print(f"\n{n_pred}/{len(images)} images got predictions in {elapsed:.1f} s; "
          f"Label Studio import file: {out_file} (labeling config beside it: labeling_config.xml)")
    if args.image_url_prefix is None:
        print(label_studio_hint(args.out.resolve(), root, folder))
    if tiny:
        print(TINY_WARNING)
    return 0
