"""End-to-end GPU benchmark: `egm-assist prelabel --folder` against the engine alone, same run, same card.

On the GPU machine (after ``bash bench/gpu_deps/install.sh && . /tmp/egm-gpu/env.sh``):

1. writes N photo-like JPEGs (default 2,048 at 1920x1080, :mod:`bench.photos`) and a
   checkpoint of the full-size EGM-4B architecture with random bf16 weights (nothing downloaded);
2. **engine only**: the worker's own engine (``create_engine`` with the worker's settings) in
   this process, on the same photos already decoded, ``batch`` images per call: images/s;
3. **end to end**: a real ``redis-server`` and one ``egm-assist worker`` on the GPU, then for each
   batch size ``egm-assist prelabel --folder DIR --batch-size B`` (bulk jobs of B tasks, the engine
   runs B at a time). The run's progress is read from Redis: the steady rate counts from the first
   finished batch to the last, so the worker's one-time start-up (load, compile, graph capture for
   that size) stays out, as the engine-only warm-up does;
4. **interactive while bulk runs**: during one more bulk run per mode, one-image interactive jobs
   enter the interactive queue as ``/predict`` enqueues them: ``--interactive-requests`` of them,
   open loop (each sent at its time whether or not the previous one was answered, about one every
   ``--interactive-every`` seconds, jittered), starting once the run's first batch is done (the
   worker's one-time warm-up of batch 1 is done by one request before the run, not counted);
   latency from enqueue to stored result, p50 / p95 / max. Modes:
   ``preempt``: the bulk worker runs them during a pause of its bulk batch
   (``EGM_PREEMPT_INTERACTIVE=true``, the default; :mod:`egm.worker.preempt`);
   ``shared``: the same worker with ``EGM_PREEMPT_INTERACTIVE=false``, which serves them between
   its batches (interactive first); ``dedicated``: a second worker on the same GPU serves only the
   interactive queue (``egm-assist worker --queues interactive``, its own copy of the model, small
   batches). The bulk rate of each run shows what the interactive work costs. The bulk worker is
   restarted when a mode needs the other setting.

Phases run in that order and are skipped once ``--budget-s`` is spent (the device call's limit).

``--quick`` fits ~200 s of GPU time including model load: 640 photos per run, batch 64, engine only
not timed (``--with-engine-only`` adds it), no separate end-to-end run (the interactive runs are
bulk runs of batch 64 and report their rate), 20 interactive requests with preemption on, then off.

The model has random weights, so its answers do not parse: every task ends ``failed`` with
``parse`` as the reason, which costs the pipeline the same as a parsed answer minus the box
conversion (microseconds). Prints a table; writes JSON + Markdown to
``bench/results/gpu-e2e-<card>.{json,md}``.

    python3 bench/gpu_e2e.py                 # GPU machine, ~8 min
    python3 bench/gpu_e2e.py --quick         # GPU machine, ~200 s: interactive latency, preemption on / off
    python3 bench/gpu_e2e.py --tiny          # CPU smoke test of this script: tiny model, 24 small photos
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import photos  # noqa: E402  (bench/photos.py)

LABELS = "person,car,dog"
#: interactive modes: how the bulk worker treats interactive jobs (see the module docstring)
MODES = {"preempt": "the bulk worker runs them in a pause of its bulk batch (EGM_PREEMPT_INTERACTIVE=true)",
         "shared": "the bulk worker takes them between its batches (EGM_PREEMPT_INTERACTIVE=false)",
         "dedicated": "a second worker on the same GPU serves only them"}


# ---------------------------------------------------------------------- setup

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU, few small photos (smoke test)")
    ap.add_argument("--quick", action="store_true", help="~200 s on the GPU: 640 photos, batch 64, interactive "
                    "latency with preemption on and off (no engine-only timing, no separate end-to-end run)")
    ap.add_argument("-n", "--images", type=int, default=None, help="photos per bulk run (default 2048; tiny 24)")
    ap.add_argument("--size", default=None, help="photo size WxH (default 1920x1080; tiny 320x240)")
    ap.add_argument("--batches", default=None, help="bulk batch sizes to run end to end (default 64,256; tiny 4,8)")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="worker engine (hf: EGM_COMPILE=true)")
    ap.add_argument("--new-tokens", type=int, default=None, help="EGM_MAX_NEW_TOKENS (default 128; tiny 16)")
    ap.add_argument("--with-engine-only", action="store_true",
                    help="--quick: time the engine alone too (~40 s more: its own model load and warm-up)")
    ap.add_argument("--engine-calls", type=int, default=None, help="timed engine-only calls per batch size "
                    "(default 3; quick 2)")
    ap.add_argument("--interactive-batch", type=int, default=None,
                    help="bulk batch size of the run with interactive traffic (default 64; tiny 4; 0: none)")
    ap.add_argument("--interactive-images", type=int, default=None,
                    help="photos in that run (default 1024; tiny 16)")
    ap.add_argument("--interactive-every", type=float, default=None, help="mean seconds between interactive jobs "
                    "(default 1.5, as in the earlier run; tiny 0.3)")
    ap.add_argument("--interactive-requests", type=int, default=None,
                    help="interactive jobs per mode (default 30; quick 20; tiny 6)")
    ap.add_argument("--interactive-modes", default=None,
                    help="comma-separated: preempt, shared, dedicated (default preempt,shared)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no phase after this many seconds (default 500; quick 190)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--run-timeout", type=float, default=420.0, help="give up on one bulk run after this")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    tiny, quick = args.tiny, args.quick
    args.images = args.images or (24 if tiny else 512 if quick else 2048)
    args.size = args.size or ("320x240" if tiny else "1920x1080")
    args.batches = [int(b) for b in (args.batches or ("4,8" if tiny else "64" if quick else "64,256")).split(",")]
    args.new_tokens = args.new_tokens or (16 if tiny else 128)
    args.engine_calls = args.engine_calls or (2 if quick else 3)
    if args.interactive_batch is None:
        args.interactive_batch = 4 if tiny else 64
    args.interactive_images = args.interactive_images or (16 if tiny else 640 if quick else 1024)
    args.interactive_every = args.interactive_every or (0.3 if tiny else 1.5)
    args.interactive_requests = args.interactive_requests or (6 if tiny else 20 if quick else 30)
    args.interactive_modes = [m for m in (args.interactive_modes or "preempt,shared").split(",") if m]
    unknown = set(args.interactive_modes) - set(MODES)
    if unknown:
        ap.error(f"unknown interactive modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    args.budget_s = args.budget_s or (190.0 if quick else 500.0)
    #: quick: the interactive runs are the end-to-end runs (bulk batch 64, their rate reported)
    args.e2e_runs = not quick
    args.engine_only = not quick or args.with_engine_only
    return args


def build_checkpoint(work: Path, tiny: bool, device: str) -> Path:
    """The model folder the worker loads (MODEL_DIR)."""
    from egm.worker.tiny_model import build_tiny_checkpoint, ensure_tiny_checkpoint

    if tiny:
        return ensure_tiny_checkpoint(work / "models", teach=False)
    target = work / "egm-4b-random"
    if not (target / "config.json").is_file():
        build_tiny_checkpoint(target, full_size=True, teach=False, device=device)
    return target


def worker_env(args, model_dir: Path, redis_url: str, prefix: str, photos_root: Path, device: str) -> dict[str, str]:
    """The settings of the worker and of this process's engine-only measurement: one source."""
    return {
        "REDIS_URL": redis_url, "EGM_QUEUE_PREFIX": prefix, "MODEL_DIR": str(model_dir),
        "EGM_ENGINE": args.engine, "EGM_COMPILE": "true", "EGM_DEVICE": device,
        "EGM_BATCH_SIZE": str(max(args.batches + [args.interactive_batch])),
        "EGM_MAX_NEW_TOKENS": str(args.new_tokens), "EGM_CACHE_TTL_S": "0", "EGM_TASK_RETRIES": "0",
        "EGM_LOCAL_FILES_ROOT": str(photos_root), "EGM_LOG_FORMAT": "json", "EGM_HEARTBEAT_S": "5",
    }


def settings_for(env: dict[str, str]):
    from egm.config.settings import reload_settings

    os.environ.update(env)
    return reload_settings()


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


# ---------------------------------------------------------------------- engine only

def engine_only(settings, files: list[Path], batches: list[int], calls: int) -> dict:
    """images/s of the worker's engine on decoded photos: warm-up call, then ``calls`` timed calls
    of ``batch`` different photos each."""
    from egm.images import fetch_many
    from egm.prompts import load_templates
    from egm.queries import build_queries
    from egm.worker.engines import EngineRequest, create_engine

    from egm.bulk.runner import local_target

    prompt = build_queries(local_target(LABELS.split(",")), load_templates(settings), settings.prompt_mode)[0].text
    need = max(batches) * (calls + 1)
    t0 = time.perf_counter()
    loaded = fetch_many([str(f) for f in (files * (need // len(files) + 1))[:need]], settings=settings)
    decode_s = time.perf_counter() - t0
    bad = [x for x in loaded if not hasattr(x, "image")]
    if bad:
        raise RuntimeError(f"photos failed to load: {bad[:2]}")
    t0 = time.perf_counter()
    engine = create_engine(settings)
    out: dict = {"load_s": time.perf_counter() - t0, "decode_s_per_image": decode_s / need,
                 "describe": engine.describe(), "batches": {}}
    sync = _sync_fn(settings)
    try:
        for b in batches:
            times = []
            for c in range(calls + 1):
                reqs = [EngineRequest(image=im.image, prompt=prompt, request_id=f"{b}:{c}:{i}")
                        for i, im in enumerate(loaded[c * b:(c + 1) * b])]
                sync()
                t = time.perf_counter()
                res = engine.generate(reqs)
                sync()
                times.append(time.perf_counter() - t)
                errors = [r.error for r in res if r.error]
                if errors:
                    raise RuntimeError(f"engine errors at batch {b}: {errors[:2]}")
            med = statistics.median(times[1:])
            out["batches"][b] = {"warmup_s": times[0], "seconds": times[1:], "median_s": med, "images_per_s": b / med}
            print(f"[engine only] batch {b:>3}: {med:7.3f} s  {b / med:7.2f} img/s  (warm-up {times[0]:.1f} s)",
                  flush=True)
    finally:
        engine.close()
        del engine
        gc.collect()
        _empty_cache()
    return out


def _sync_fn(settings):
    try:
        import torch
    except ImportError:
        return lambda: None
    return torch.cuda.synchronize if torch.cuda.is_available() and settings.device != "cpu" else (lambda: None)


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---------------------------------------------------------------------- end to end

class ProgressSampler(threading.Thread):
    """Polls the run's progress in Redis: (seconds since start, tasks resolved); ``first_done`` is set
    once the first batch is resolved."""

    def __init__(self, store, run_id_holder: dict, t0: float) -> None:
        super().__init__(daemon=True, name="progress-sampler")
        self.store, self.holder, self.t0 = store, run_id_holder, t0
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.first_done = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            run_id = self.holder.get("run_id") or self._find()
            if not run_id:
                continue
            p = self.store.progress(run_id)
            if p is not None:
                self.samples.append((time.perf_counter() - self.t0, p.resolved))
                if p.resolved > 0:
                    self.first_done.set()

    def _find(self) -> str | None:
        new = set(self.store.runs()) - self.holder["known"]
        if len(new) == 1:
            self.holder["run_id"] = new.pop()
            return self.holder["run_id"]
        return None


def steady_rate(samples: list[tuple[float, int]], total: int) -> dict:
    """Rate from the first finished batch to the last: the worker's start-up and the first batch's
    graph capture are not part of it."""
    first = next(((t, n) for t, n in samples if n > 0), None)
    last = next(((t, n) for t, n in samples if n >= total), None)
    if first is None or last is None or last[0] <= first[0]:
        return {"images_per_s": None, "first_batch_done_s": first[0] if first else None}
    return {"images_per_s": (last[1] - first[1]) / (last[0] - first[0]), "first_batch_done_s": first[0],
            "last_done_s": last[0], "counted_images": last[1] - first[1]}


def interactive_job(image: str, model_version: str):
    """One image, one typed prompt, as /predict enqueues it."""
    from egm.bulk.runner import local_target
    from egm.contract import BatchJob, Priority, Query, TaskJob

    return BatchJob(priority=Priority.interactive, model_version=model_version, target=local_target(LABELS.split(",")),
                    tasks=[TaskJob(ref="interactive", image=image,
                                   queries=[Query(text="Locate the red car, output its bbox coordinates using JSON "
                                                       "format", expression="the red car")])],
                    deliver_late=False)


def warm_interactive(settings, image: str, model_version: str, timeout_s: float = 300) -> float:
    """One interactive job on an idle worker, not counted: its first batch of 1 compiles and captures."""
    from egm.queue import QueueClient

    queue = QueueClient(settings)
    job = interactive_job(image, model_version)
    t = time.perf_counter()
    queue.enqueue(job)
    if queue.wait_any([job.job_id], time.time() + timeout_s) is None:
        raise TimeoutError(f"the warm-up interactive job got no result within {timeout_s:.0f} s")
    return time.perf_counter() - t


class InteractiveClient(threading.Thread):
    """``requests`` one-image interactive jobs, open loop: each is enqueued at its time (about one every
    ``every_s`` seconds, jittered, seeded) whether or not earlier ones were answered, from when ``go``
    is set (the bulk run's first batch done) until all are sent or ``stop`` is set (the run ended)."""

    def __init__(self, settings, image: str, model_version: str, every_s: float, requests: int) -> None:
        super().__init__(daemon=True, name="interactive")
        from egm.queue import QueueClient

        self.queue = QueueClient(settings)
        self.image, self.model_version, self.every_s, self.requests = image, model_version, every_s, requests
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        self.go = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        import random

        rng = random.Random(13)
        while not self.go.wait(0.1):
            if self.stop.is_set():
                return
        waiters = []
        for _ in range(self.requests):
            if self.stop.is_set():
                break  # the bulk run is over: later requests would not measure the load
            job = interactive_job(self.image, self.model_version)
            t = time.perf_counter()
            self.queue.enqueue(job)
            self.sent += 1
            w = threading.Thread(target=self._wait, args=(job.job_id, t), daemon=True)
            w.start()
            waiters.append(w)
            self.stop.wait(self.every_s * rng.uniform(0.5, 1.5))
        for w in waiters:
            w.join(130)

    def _wait(self, job_id: str, t: float) -> None:
        done = self.queue.wait_any([job_id], time.time() + 120)
        with self._lock:
            if done is None:
                self.errors.append("no result within 120 s")
            else:
                self.latencies.append(time.perf_counter() - t)


def run_prelabel(env: dict[str, str], folder: Path, batch: int, out_dir: Path, log: Path, store,
                 timeout_s: float, interactive: InteractiveClient | None = None) -> dict:
    holder = {"known": set(store.runs())}
    t0 = time.perf_counter()
    sampler = ProgressSampler(store, holder, t0)
    sampler.start()
    if interactive is not None:
        interactive.go = sampler.first_done
        interactive.start()
    cmd = [sys.executable, "-m", "egm.cli", "prelabel", "--folder", str(folder), "--labels", LABELS,
           "--batch-size", str(batch), "--out", str(out_dir), "--json", "--quiet", "--timeout", str(timeout_s)]
    with open(log, "ab") as fh:
        proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=fh,
                              timeout=timeout_s + 60)
    wall = time.perf_counter() - t0
    if interactive is not None:
        interactive.stop.set()
        interactive.join(130)
    time.sleep(0.3)
    sampler.stop.set()
    sampler.join(5)
    try:
        summary = json.loads(proc.stdout.decode() or "{}")
    except ValueError:
        summary = {"unparsed_stdout": proc.stdout.decode()[-2000:]}
    total = int((summary.get("progress") or {}).get("total") or 0)
    result = {"batch": batch, "exit_code": proc.returncode, "wall_s": wall, "images": total,
              "wall_images_per_s": total / wall if wall else None,
              "progress": summary.get("progress"), **steady_rate(sampler.samples, total)}
    if interactive is not None:
        lat = sorted(interactive.latencies)
        result["interactive"] = {
            "requests": len(lat), "sent": interactive.sent, "errors": interactive.errors[:5],
            "every_s": interactive.every_s, "arrivals": "open loop",
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "max_s": lat[-1] if lat else None,
            "samples": [round(x, 4) for x in lat],
        }
    return result


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def wait_worker_ready(log: Path, proc, timeout_s: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited ({proc.returncode}) before it was ready; see {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        if log.exists() and "worker ready" in log.read_text(errors="replace"):
            return time.perf_counter() - t0
        time.sleep(0.2)
    raise TimeoutError(f"worker not ready after {timeout_s:.0f} s; see {log}")


def worker_batches(log: Path) -> list[dict]:
    """The worker's "batch done" log lines (JSON): per batch its GPU seconds, image seconds, tasks."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"batch done"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def hardlinked_copy(src: Path, dst: Path, files: list[Path]) -> list[Path]:
    """The same photos under another folder (another run id, nothing skipped as done), without copying."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dst / f.name
        if not target.exists():
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
        out.append(target)
    return out


# ---------------------------------------------------------------------- report

def markdown(rec: dict) -> str:
    lines = [
        f"# End-to-end GPU benchmark: {rec['card']}",
        "",
        f"`egm-assist prelabel --folder` over {rec['images']} photo-like {rec['size']} JPEGs with one local worker "
        f"({rec['engine']}), a real redis-server, {rec['model']} with random {rec['dtype']} weights, "
        f"{rec['new_tokens']} new tokens at most. {rec['date']}.",
        "",
        "| batch | engine only img/s | end to end img/s (steady) | e2e / engine | wall incl. start-up | "
        "worker GPU share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    if not rec["e2e"]:  # --quick: engine only, then the interactive runs
        only = [f"Engine only, batch {b}: {_f(r.get('images_per_s'))} img/s."
                for b, r in (rec.get("engine_only") or {}).get("batches", {}).items()]
        lines = lines[:-3] + ([""] + only if only else [])
    for b, r in rec["e2e"].items():
        eng = rec["engine_only"]["batches"].get(b) or rec["engine_only"]["batches"].get(int(b)) or {}
        e_rate, s_rate = eng.get("images_per_s"), r.get("images_per_s")
        ratio = s_rate / e_rate if (e_rate and s_rate) else None
        lines.append(f"| {b} | {_f(e_rate)} | {_f(s_rate)} | {_pct_str(ratio)} | "
                     f"{_f(r.get('wall_s'), 's')} ({_f(r.get('wall_images_per_s'))} img/s) | "
                     f"{_pct_str(r.get('gpu_share'))} |")
    inter_rows = [(mode, r) for mode, r in (rec.get("interactive") or {}).items() if r.get("interactive")]
    if inter_rows:
        first = inter_rows[0][1]
        eng = rec["engine_only"]["batches"]
        e_rate = (eng.get(first["batch"]) or eng.get(str(first["batch"])) or {}).get("images_per_s")
        lines += ["", f"Interactive one-image jobs while a bulk run (batch {first['batch']}, "
                      f"{first.get('images')} photos) keeps the GPU busy: "
                      f"{first['interactive']['sent']} requests per mode, open loop, about one every "
                      f"{first['interactive']['every_s']:g} s, from the run's first finished batch on; latency "
                      "from enqueue to stored result (same run, same card).", "",
                  "| mode | how | answered | p50 | p95 | max | bulk img/s meanwhile | bulk / engine only | "
                  "run in a pause |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for mode, r in inter_rows:
            i = r["interactive"]
            rate = r.get("images_per_s")
            lines.append(f"| {mode} | {MODES.get(mode, '')} | {i['requests']}/{i['sent']} | {_f(i['p50_s'], 's')} | "
                         f"{_f(i['p95_s'], 's')} | {_f(i['max_s'], 's')} | {_f(rate)} | "
                         f"{_pct_str(rate / e_rate if rate and e_rate else None)} | "
                         f"{r.get('preempted', '-')} |")
    lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in rec.get("goals", {}).items()), ""]
    return "\n".join(lines)


def _pct_str(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _f(x, unit: str = "") -> str:
    return "-" if x is None else (f"{x:.3f} {unit}".strip() if x < 10 else f"{x:.1f} {unit}".strip())


def goals(rec: dict) -> dict:
    out = {}
    for b, r in rec["e2e"].items():
        eng = rec["engine_only"]["batches"].get(b) or rec["engine_only"]["batches"].get(int(b)) or {}
        if eng.get("images_per_s") and r.get("images_per_s"):
            ratio = r["images_per_s"] / eng["images_per_s"]
            out[f"e2e >= 90% of engine at batch {b}"] = f"{ratio:.0%} ({'met' if ratio >= 0.9 else 'missed'})"
    for mode, res in (rec.get("interactive") or {}).items():
        inter = res.get("interactive") or {}
        if inter.get("p95_s") is not None:
            out[f"interactive p95 <= 1 s ({mode})"] = (f"{inter['p95_s']:.2f} s "
                                                       f"({'met' if inter['p95_s'] <= 1 else 'missed'})")
    return out


# ---------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from egm import processes
    from egm.fleet import Fleet
    from egm.bulk.run_store import RunStore

    t_start = time.perf_counter()
    try:
        import torch

        cuda = torch.cuda.is_available() and not args.tiny
    except ImportError:
        cuda = False
    device = "cuda:0" if cuda else "cpu"
    card = card_name(device)
    print(f"device: {card}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="egm-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    n_all = max(args.images, args.interactive_images)

    # photos in the background while the checkpoint is written (both before anything is timed)
    photo_dir = work / "photos"
    gen = threading.Thread(target=photos.make_photos, args=(photo_dir, n_all, width, height), daemon=True)
    t0 = time.perf_counter()
    gen.start()
    model_dir = build_checkpoint(work, args.tiny, device)
    gc.collect()
    _empty_cache()  # the builder's copy of the weights: the worker needs the memory
    gen.join()
    files = sorted(photo_dir.glob("photo-*.jpg"))[:n_all]
    mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
    print(f"{len(files)} photos ({mb:.2f} MB each) and the checkpoint ready in {time.perf_counter() - t0:.0f} s",
          flush=True)

    redis_proc, redis_url = processes.start_redis(work / "redis")
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    env = worker_env(args, model_dir, redis_url, prefix, work, device)
    settings = settings_for(env)
    record: dict = {
        "card": card, "device": device, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "engine": args.engine + (" (EGM_COMPILE=true)" if args.engine == "hf" else ""),
        "model": "tiny Qwen3-VL" if args.tiny else "EGM-4B architecture (Qwen3-VL-4B)",
        "dtype": "float32" if not cuda else "bfloat16", "images": args.images, "size": args.size,
        "photo_mb": mb, "new_tokens": args.new_tokens, "batches": args.batches, "e2e": {}, "settings": env,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("gpu-e2e-" + "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
            + ("" if args.engine == "hf" else f"-{args.engine}") + ("-tiny" if args.tiny else ""))

    def save() -> None:
        record["goals"] = goals(record)
        safe = {k: v for k, v in record.items() if k != "settings"}
        safe["settings"] = {k: v for k, v in env.items() if k not in ("REDIS_URL",)}
        (args.out / f"{stem}.json").write_text(json.dumps(safe, indent=2, default=str) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(record))

    bulk = BulkWorker(env, work)
    extra_workers: list = []
    try:
        record["engine_only"] = (engine_only(settings, files, args.batches, args.engine_calls) if args.engine_only
                                 else {"skipped": "--quick", "batches": {}})
        save()
        store = RunStore(processes_redis(redis_url), prefix)
        (work / "prelabel.log").unlink(missing_ok=True)  # a kept --work folder: only this run's lines count
        modes = args.interactive_modes if args.interactive_batch else []
        first_preempt = modes[0] == "preempt" if modes and not args.e2e_runs else True
        record["worker_ready_s"] = bulk.start(preempt=first_preempt)
        print(f"worker ready in {record['worker_ready_s']:.0f} s", flush=True)
        for b in (args.batches if args.e2e_runs else []):
            if time.perf_counter() - t_start > args.budget_s:
                record["e2e"][b] = {"skipped": "time budget"}
                continue
            folder = work / f"run-b{b}"
            run_files = hardlinked_copy(photo_dir, folder, files[:args.images])
            res = run_prelabel(env, folder, b, work / f"out-b{b}", work / "prelabel.log", store, args.run_timeout)
            res["worker"] = _worker_summary(bulk.new_batches())
            res["gpu_share"] = res["worker"].get("gpu_share")
            record["e2e"][b] = res
            print(f"[end to end] batch {b:>3}: {_f(res.get('images_per_s'))} img/s steady, "
                  f"{res['wall_s']:.1f} s wall for {len(run_files)} photos (exit {res['exit_code']})", flush=True)
            save()
        record["interactive"] = {}
        for mode in modes:
            if time.perf_counter() - t_start > args.budget_s:
                record["interactive"][mode] = {"skipped": "time budget"}
                print(f"[interactive {mode}] skipped: time budget", flush=True)
                continue
            if bulk.preempt != (mode == "preempt"):
                print(f"bulk worker restarted ({'EGM_PREEMPT_INTERACTIVE=' + str(mode == 'preempt').lower()}) "
                      f"in {bulk.start(preempt=mode == 'preempt'):.0f} s", flush=True)
            iworker = None
            if mode == "dedicated":
                ilog = work / "worker-interactive.log"
                ilog.unlink(missing_ok=True)
                iworker = processes.spawn(["worker", "--name", "e2e-interactive", "--queues", "interactive"],
                                          {**env, "EGM_BATCH_SIZE": "8"}, ilog)
                extra_workers.append(iworker)
                print(f"interactive worker ready in {wait_worker_ready(ilog, iworker, 600):.0f} s", flush=True)
            live = Fleet.from_settings(settings, processes_redis(redis_url)).current_version()  # the workers' own
            warm_s = warm_interactive(settings, str(files[0]), live)
            bulk.new_batches()  # the warm-up is not part of the run
            folder = work / f"run-interactive-{mode}"
            hardlinked_copy(photo_dir, folder, files[:args.interactive_images])
            client = InteractiveClient(settings, str(files[0]), live, args.interactive_every,
                                       args.interactive_requests)
            res = run_prelabel(env, folder, args.interactive_batch, work / f"out-interactive-{mode}",
                               work / "prelabel.log", store, args.run_timeout, interactive=client)
            res["worker"] = _worker_summary(bulk.new_batches())
            res["batch"] = args.interactive_batch
            res["warm_up_s"] = warm_s
            res["preempted"] = bulk.preempted()
            record["interactive"][mode] = res
            if iworker is not None:
                processes.stop(iworker)
                extra_workers.remove(iworker)
            i = res["interactive"]
            print(f"[interactive {mode}] {i['requests']}/{i['sent']} answered during a batch-{args.interactive_batch} "
                  f"run: p50 {_f(i['p50_s'], 's')}, p95 {_f(i['p95_s'], 's')}, max {_f(i['max_s'], 's')}; bulk "
                  f"{_f(res.get('images_per_s'))} img/s; {res['preempted']} run in a pause", flush=True)
            save()
    finally:
        bulk.stop()
        for proc in extra_workers:
            processes.stop(proc)
        processes.stop(redis_proc)
        record["total_s"] = time.perf_counter() - t_start
        save()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(record))
    print(f"wrote {args.out / stem}.json and .md in {record['total_s']:.0f} s")
    return 0


class BulkWorker:
    """The bulk worker (``egm-assist worker``), restarted with another EGM_PREEMPT_INTERACTIVE when a mode
    needs it; each start logs to a file of its own, read for the per-batch log lines."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env, self.work = env, work
        self.proc = None
        self.log: Path | None = None
        self.preempt: bool | None = None
        self.starts = 0
        self._seen = 0
        self._seen_preempted = 0

    def start(self, preempt: bool) -> float:
        from egm import processes

        self.stop()
        self.starts += 1
        self.log = self.work / f"worker-{self.starts}.log"
        self.log.unlink(missing_ok=True)
        self.proc = processes.spawn(["worker", "--name", f"e2e-w{self.starts}"],
                                    {**self.env, "EGM_PREEMPT_INTERACTIVE": str(preempt).lower()}, self.log)
        self.preempt, self._seen, self._seen_preempted = preempt, 0, 0
        return wait_worker_ready(self.log, self.proc, 600)

    def new_batches(self) -> list[dict]:
        """The "batch done" lines since the last call."""
        lines = worker_batches(self.log) if self.log else []
        out, self._seen = lines[self._seen:], len(lines)
        return out

    def preempted(self) -> int:
        """Interactive jobs run in a pause of a bulk batch since the last call."""
        n = self.log.read_text(errors="replace").count("interactive job runs in a pause") if self.log else 0
        out, self._seen_preempted = n - self._seen_preempted, n
        return out

    def stop(self) -> None:
        from egm import processes

        if self.proc is not None:
            processes.stop(self.proc)
            self.proc = None


def processes_redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def _worker_summary(batches: list[dict]) -> dict:
    """Where the worker's time went, from its per-batch log lines."""
    bulk = [b for b in batches if b.get("priority") == "bulk"]
    if len(bulk) < 2:
        return {"batches": len(bulk)}
    span = bulk[-1]["ts"] - bulk[0]["ts"]  # first batch (warm-up) excluded: it ends where the span starts
    gpu = sum(float(b.get("gpu_s") or 0) for b in bulk[1:])
    return {"batches": len(bulk), "span_s": span, "gpu_s": gpu, "gpu_share": gpu / span if span > 0 else None,
            "image_s": sum(float(b.get("image_s") or 0) for b in bulk[1:])}


if __name__ == "__main__":
    raise SystemExit(main())
