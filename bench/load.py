"""Load: a large bulk run and interactive /predict calls at the same time, on the real processes.

Scenario: a bulk run of N tasks (batch jobs written straight to Redis, as ``prelabel``
enqueues them) over distinct small images, served by W worker processes with the no-op
scripted engine and the result cache off (every task goes through image loading, the
engine call, parsing and result building); meanwhile C clients call the backend's
``/predict`` with one task each, in a loop, as annotators opening tasks do. Measured: bulk
throughput, interactive latency (p50/p95/p99/max), Redis memory before / at peak / after,
and what the run leaves in Redis: queues and registries must be empty, and every key that
grows with the number of jobs must carry a TTL (results, wake-ups, RQ jobs) or sit in a
registry whose entries expire.

    .venv/bin/python bench/load.py                       # full size: 10,000 tasks, 3 workers
    .venv/bin/python bench/load.py --tasks 1000 --workers 2

Prints a table and writes ``bench/results/load-<tasks>.json``. ``tests/test_load.py`` runs the
same scenario (a smaller size in CI; the full size with ``-m full`` or ``EGM_LOAD_FULL=1``).
Needs ``redis-server`` (started privately here) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import redis  # noqa: E402
from PIL import Image  # noqa: E402

from egm.config.settings import Settings  # noqa: E402
from egm import processes  # noqa: E402
from egm.contract import BatchJob, LabelTarget, Priority, Query, TaskJob  # noqa: E402
from egm.fleet import Fleet  # noqa: E402
from egm.queue import QueueClient  # noqa: E402
from egm.bulk.run_store import RunStore  # noqa: E402

TARGET = LabelTarget(from_name="label", to_name="image", labels=["circle", "square"],
                     aliases={"circle": "circle", "square": "square"})
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="circle" background="#e6194b"/><Label value="square" background="#4363d8"/></RectangleLabels></View>"""
PROMPT = ('Locate every instance that belongs to the following categories: "circle, square". '
          'Report bbox coordinates in JSON format.')
#: keys that may live without a TTL: fixed per deployment, or registries whose entries expire.
PERMANENT_KEY_PATTERNS = ("rq:queues", "rq:workers", "rq:queue:", "rq:wip:", "rq:finished:", "rq:failed:",
                          "rq:deferred:", "rq:scheduled:", "rq:canceled:", "rq:workers:", "rq:cron",
                          ":stats", ":runs", ":late", ":retries", "rq:suspended", "rq:clean_registries:",
                          # one entry per model_version / live worker, not per job (egm.fleet)
                          ":fleet:versions:", ":fleet:workers")
REGISTRIES = ("rq:finished:", "rq:failed:")


@dataclass
class LoadSpec:
    tasks: int = 10_000
    workers: int = 3
    batch_size: int = 8
    interactive_clients: int = 4
    interactive_pause_s: float = 0.05
    #: scripted engine: seconds per engine call (0 = no-op; >0 simulates GPU time per batch)
    engine_delay_s: float = 0.0
    distinct_images: int = 64
    result_ttl_s: int = 3600
    predict_budget_s: float = 25.0
    timeout_s: float = 900.0


@dataclass
class LoadReport:
    spec: LoadSpec
    machine: dict = field(default_factory=dict)
    bulk_done: int = 0
    bulk_failed: int = 0
    bulk_wall_s: float = 0.0
    bulk_tasks_per_s: float = 0.0
    enqueue_s: float = 0.0
    interactive_calls: int = 0
    interactive_during_bulk: int = 0
    interactive_ok: int = 0
    interactive_empty: int = 0
    interactive_errors: list[str] = field(default_factory=list)
    latency_s: dict[str, float] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    keys_after: int = 0
    #: keys without a TTL that are not fixed structures (must be empty)
    unbounded_keys: list[str] = field(default_factory=list)
    #: longest TTL per key family (seconds), e.g. {"result": 3600}
    ttl_by_family: dict[str, int] = field(default_factory=dict)
    #: how many keys of each family were left
    keys_by_family: dict[str, int] = field(default_factory=dict)
    #: registry entries that expire later than result_ttl from now (must be empty)
    lingering_registry_entries: int = 0
    queues_after: dict = field(default_factory=dict)
    late_pending: int = 0

    @property
    def drained(self) -> bool:
        return all(v["queued"] == 0 and v["started"] == 0 and v["failed"] == 0 for v in self.queues_after.values())


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(q / 100 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def make_images(folder: Path, n: int) -> list[Path]:
    """Small distinct images (the result cache is off; distinct content keeps that honest anyway)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (96, 64), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        im.paste((rng.randrange(256), 0, 0), (10 + i % 40, 10, 40 + i % 40, 40))
        path = folder / f"img{i:04d}.png"
        im.save(path)
        paths.append(path)
    return paths


def bulk_jobs(images: list[Path], n: int, batch: int, run_id: str, model_version: str) -> list[BatchJob]:
    tasks = [TaskJob(task_id=i + 1, image=str(images[i % len(images)]), queries=[Query(text=PROMPT)])
             for i in range(n)]
    return [BatchJob(priority=Priority.bulk, model_version=model_version, target=TARGET, tasks=tasks[i:i + batch],
                     run_id=run_id) for i in range(0, n, batch)]


class InteractiveClients:
    """Threads that call /predict with one task each, in a loop, until stopped."""

    def __init__(self, url: str, images: list[Path], n: int, pause_s: float, timeout_s: float) -> None:
        self.url, self.images, self.pause_s, self.timeout_s = url, images, pause_s, timeout_s
        #: (start time, seconds) of every answered call
        self.calls: list[tuple[float, float]] = []
        self.empty = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                image = str(self.images[rng.randrange(len(self.images))])
                body = {"tasks": [{"id": 10_000_000 + rng.randrange(10**6), "data": {"image": image}}],
                        "label_config": CONFIG}
                t0 = time.perf_counter()
                try:
                    resp = client.post(self.url + "/predict", json=body)
                    elapsed = time.perf_counter() - t0
                    with self._lock:
                        if resp.status_code != 200:
                            self.errors.append(f"HTTP {resp.status_code}: {resp.text[:120]}")
                        else:
                            self.calls.append((t0, elapsed))
                            if resp.json()["results"] == [[]]:
                                self.empty += 1
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(type(exc).__name__)
                self._stop.wait(self.pause_s)


def used_memory(conn: redis.Redis) -> int:
    return int(conn.info("memory")["used_memory"])


def _family(key: str, prefix: str) -> str:
    if key.startswith(prefix + ":"):
        return key[len(prefix) + 1:].split(":", 1)[0]
    parts = key.split(":")
    return ":".join(parts[:2]) if key.startswith("rq:") else parts[0]


def inspect_keys(conn: redis.Redis, prefix: str, result_ttl_s: int, report: LoadReport) -> None:
    """What the run left in Redis: keys without TTL outside the fixed structures, TTLs per family."""
    now = time.time()
    keys = [k.decode() for k in conn.scan_iter(count=1000)]
    report.keys_after = len(keys)
    ttls: dict[str, int] = {}
    counts: dict[str, int] = {}
    for key in keys:
        ttl = conn.ttl(key)
        family = _family(key, prefix)
        counts[family] = counts.get(family, 0) + 1
        if ttl == -1:
            if not any(p in key for p in PERMANENT_KEY_PATTERNS):
                report.unbounded_keys.append(key)
            continue
        ttls[family] = max(ttls.get(family, 0), ttl)
    for key in keys:
        if key.startswith(REGISTRIES):
            latest = conn.zrange(key, -1, -1, withscores=True)
            if latest and latest[0][1] > now + result_ttl_s + 60 and latest[0][1] != float("inf"):
                report.lingering_registry_entries += int(conn.zcount(key, now + result_ttl_s + 60, "+inf"))
    report.ttl_by_family = dict(sorted(ttls.items()))
    report.keys_by_family = dict(sorted(counts.items()))


def run_load(spec: LoadSpec, redis_url: str, workdir: Path, log=print) -> LoadReport:
    """Run the scenario against the Redis at ``redis_url`` (its database should hold nothing else)."""
    report = LoadReport(spec=spec, machine={"python": platform.python_version(), "cpus": _cpus(),
                                            "platform": platform.platform()})
    prefix = f"load{uuid.uuid4().hex[:6]}"
    conn = redis.Redis.from_url(redis_url)
    report.memory_bytes["before"] = used_memory(conn)
    images = make_images(workdir / "images", spec.distinct_images)
    port = processes.free_port()
    env = {"REDIS_URL": redis_url, "EGM_QUEUE_PREFIX": prefix, "EGM_ENGINE": "scripted", "EGM_PORT": str(port),
           "EGM_LOCAL_FILES_ROOT": str(images[0].parent), "EGM_CACHE_TTL_S": "0", "EGM_HEARTBEAT_S": "2",
           "EGM_BATCH_SIZE": str(spec.batch_size), "EGM_RESULT_TTL_S": str(spec.result_ttl_s),
           "EGM_PREDICT_BUDGET_S": str(spec.predict_budget_s), "EGM_LOG_LEVEL": "WARNING", "EGM_TASK_RETRIES": "0",
           "EGM_SCRIPTED_DELAY_S": str(spec.engine_delay_s)}
    procs = []
    clients = None
    try:
        procs.append(processes.spawn(["serve"], env, workdir / "logs" / "backend.log"))
        for i in range(spec.workers):
            procs.append(processes.spawn(["worker", "--name", f"{prefix}-w{i}"], env, workdir / "logs" / f"w{i}.log"))
        url = f"http://127.0.0.1:{port}"
        processes.wait_http(url + "/health", 60, procs[0])
        queue = QueueClient(Settings(redis_url=redis_url, queue_prefix=prefix, result_ttl_s=spec.result_ttl_s,
                                     batch_size=spec.batch_size))
        version = _wait_workers(conn, queue, spec.workers)

        run_id = f"{prefix}-run"
        jobs = bulk_jobs(images, spec.tasks, spec.batch_size, run_id, version)
        store = RunStore(conn, prefix)
        store.create(run_id, total=spec.tasks, model_version=version, source="bench/load.py")
        clients = InteractiveClients(url, images, spec.interactive_clients, spec.interactive_pause_s,
                                     spec.predict_budget_s + 30)
        _warm_up(url, images[0])  # first-call costs (imports, templates) are not load
        clients.start()
        t0 = time.perf_counter()
        for i in range(0, len(jobs), 500):  # a few round trips, as the planner does
            queue.enqueue_many(jobs[i:i + 500])
            store.add_enqueued(run_id, sum(len(j.tasks) for j in jobs[i:i + 500]))
        report.enqueue_s = time.perf_counter() - t0
        peak = used_memory(conn)
        deadline = time.monotonic() + spec.timeout_s
        last_log = 0.0
        while True:
            progress = store.progress(run_id)
            peak = max(peak, used_memory(conn))
            finished = progress.done + progress.failed if progress else 0
            if finished >= spec.tasks:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"bulk run not finished after {spec.timeout_s:.0f} s ({finished}/{spec.tasks})")
            if time.monotonic() - last_log > 5:
                log(f"  {finished}/{spec.tasks} tasks, {len(clients.calls)} interactive calls")
                last_log = time.monotonic()
            time.sleep(0.2)
        report.bulk_wall_s = time.perf_counter() - t0
        bulk_end = time.perf_counter()
        clients.stop()
        report.bulk_done, report.bulk_failed = progress.done, progress.failed
        report.bulk_tasks_per_s = spec.tasks / report.bulk_wall_s
        _wait_idle(queue, 30)
        report.memory_bytes["peak"] = peak
        report.memory_bytes["after"] = used_memory(conn)
    finally:
        if clients is not None:
            clients.stop()
        for p in procs:
            processes.stop(p)
    # latency of the calls made while the bulk run was in progress (the point of the exercise)
    lat = [s for start, s in clients.calls if start < bulk_end]
    report.interactive_calls = len(clients.calls) + len(clients.errors)
    report.interactive_during_bulk = len(lat)
    report.interactive_ok = len(clients.calls) - clients.empty
    report.interactive_empty = clients.empty
    report.interactive_errors = clients.errors[:20]
    report.latency_s = {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                        "max": max(lat) if lat else float("nan")}
    report.queues_after = queue.depths()
    report.late_pending = queue.late_pending()
    inspect_keys(conn, prefix, spec.result_ttl_s, report)
    return report


def _wait_workers(conn: redis.Redis, queue: QueueClient, n: int, timeout_s: float = 60) -> str:
    """Wait until ``n`` workers are ready (fleet registry); the model_version they serve."""
    fleet = Fleet(conn, queue.prefix)
    view = fleet.wait_for_ready(timeout_s, poll_s=0.2, accept=lambda v: len(v.ready) >= n)
    return view.current_version()


def _warm_up(url: str, image: Path) -> None:
    body = {"tasks": [{"id": 1, "data": {"image": str(image)}}], "label_config": CONFIG}
    httpx.post(url + "/predict", json=body, timeout=60).raise_for_status()


def _wait_idle(queue: QueueClient, timeout_s: float) -> None:
    """Interactive calls still in flight when the clients stopped: let them finish."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = queue.depths()
        if all(v["queued"] == 0 and v["started"] == 0 for v in d.values()):
            return
        time.sleep(0.2)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def table(report: LoadReport) -> str:
    s, lat, mem = report.spec, report.latency_s, report.memory_bytes
    rows = [
        ("bulk tasks", f"{s.tasks:,} ({report.bulk_done:,} done, {report.bulk_failed} failed)"),
        ("workers / batch size", f"{s.workers} / {s.batch_size}"),
        ("bulk wall time", f"{report.bulk_wall_s:.1f} s ({report.bulk_tasks_per_s:.0f} tasks/s)"),
        ("enqueue", f"{report.enqueue_s:.2f} s"),
        ("engine", "no-op" if not s.engine_delay_s else f"scripted, {s.engine_delay_s * 1000:.0f} ms per batch"),
        ("interactive calls", f"{report.interactive_calls} from {s.interactive_clients} clients, "
                              f"{report.interactive_during_bulk} during the bulk run "
                              f"({report.interactive_empty} empty, {len(report.interactive_errors)} errors)"),
        ("interactive latency", f"(during bulk) p50 {lat['p50']:.3f} s, p95 {lat['p95']:.3f} s, "
                                f"p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s"),
        ("Redis used_memory", f"before {mem['before'] / 2**20:.1f} MiB, peak {mem['peak'] / 2**20:.1f} MiB, "
                              f"after {mem['after'] / 2**20:.1f} MiB"),
        ("keys after", f"{report.keys_after} ({len(report.unbounded_keys)} without TTL outside fixed structures)"),
        ("longest TTLs", ", ".join(f"{k} {v} s" for k, v in report.ttl_by_family.items()) or "-"),
        ("queues after", "drained" if report.drained else json.dumps(report.queues_after)),
        ("machine", f"{report.machine['cpus']} CPUs, Python {report.machine['python']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=LoadSpec.tasks)
    ap.add_argument("--workers", type=int, default=LoadSpec.workers)
    ap.add_argument("--batch-size", type=int, default=LoadSpec.batch_size)
    ap.add_argument("--clients", type=int, default=LoadSpec.interactive_clients)
    ap.add_argument("--engine-delay-s", type=float, default=0.0,
                    help="scripted engine seconds per batch (0: no-op; e.g. 0.05 to simulate GPU time)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    spec = LoadSpec(tasks=args.tasks, workers=args.workers, batch_size=args.batch_size,
                    interactive_clients=args.clients, engine_delay_s=args.engine_delay_s)
    with tempfile.TemporaryDirectory(prefix="egm-load-") as tmp:
        proc, url = processes.start_redis(Path(tmp) / "redis")
        try:
            print(f"load: {spec.tasks:,} bulk tasks, {spec.workers} workers, {spec.interactive_clients} "
                  f"interactive clients")
            report = run_load(spec, url, Path(tmp))
        finally:
            processes.stop(proc)
    print(table(report))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"load-{spec.tasks}{'-delay' if spec.engine_delay_s else ''}.json"
    out.write_text(json.dumps({**asdict(report), "drained": report.drained,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    ok = report.drained and not report.unbounded_keys and report.bulk_done + report.bulk_failed == spec.tasks
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
