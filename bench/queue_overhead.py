"""Pipeline benchmark: how much the bulk path costs around the model.

Label Studio project -> ``prelabel`` planner (task listing, enqueue) -> Redis/RQ ->
worker processes (image load, no-op scripted engine, parse, Label Studio result,
result store) -> predictions written back to Label Studio in batches; for 1, 2 and
4 worker processes. A second mode runs the same over a local folder (no Label
Studio) to separate the queue/worker cost from Label Studio's write cost.

Per-task overhead = wall time x workers / tasks: the worker time the pipeline
spends on one task when the engine takes no time. A GPU running EGM spends tens of
milliseconds per image (REFERENCE.md 3: ~45 ms at batch 64 on an H200), so an overhead
well under that keeps the GPU fed; the goal is under 5 ms.

With ``--engine-seconds 64:1.3,256:4.0`` the scripted engine takes that long per call of that
many images (the GPU batch time measured by ``bench/gpu_e2e.py``), one call per job: the
table then says how close the whole bulk path through the real Label Studio comes to the
engine alone (``e2e / engine``), with the write-behind outbox on and off (``--write-behind``).

Usage: ``.venv/bin/python bench/queue_overhead.py [--tasks 400] [--workers 1,2,4] [--batch-size 8]
[--modes label_studio,local] [--engine-seconds B:S,...] [--write-behind on,off] [--machine NAME]``. Needs redis-server and, for the
label_studio mode, the test Label Studio (``.lsvenv``, see tests/fixtures/labelstudio.py).
Prints a table and writes ``bench/results/pipeline-<machine>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from egm import processes  # noqa: E402
from tests.bulk_support import image_bytes  # noqa: E402
from tests.stack import BOXES_CONFIG  # noqa: E402

from machine import cpu_model  # noqa: E402  (bench/machine.py)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--batch-sizes", default="8,32", help="tasks per batch job (EGM_BULK_BATCH_SIZE)")
    p.add_argument("--modes", default="label_studio,local")
    p.add_argument("--machine", default=f"cpu{os.cpu_count()}")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best is kept)")
    p.add_argument("--engine-seconds", default="",
                   help="simulated engine time per call, per batch size, e.g. 64:1.3,256:4.0 (the job size is the "
                        "batch size then; default: a no-op engine and --batch-sizes)")
    p.add_argument("--write-behind", default="on", help="on, off or on,off (EGM_WRITE_BEHIND)")
    return p.parse_args()


class Bench:
    def __init__(self, args, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs = []
        self.redis_url = ""
        self.ls = None
        self.seed = 0

    # -- services -------------------------------------------------------------------
    def start(self, need_ls: bool) -> None:
        proc, self.redis_url = processes.start_redis(self.workdir / "redis")
        self.procs.append(proc)
        if need_ls:
            from tests.fixtures.labelstudio import LabelStudioServer, label_studio_binary

            self.ls = LabelStudioServer(binary=label_studio_binary(), port=processes.free_port(), workdir=self.workdir / "ls")
            print("starting Label Studio (about 30 s) ...", flush=True)
            self.ls.start()

    def stop(self) -> None:
        if self.ls is not None:
            self.ls.stop()
        for proc in self.procs:
            processes.stop(proc)

    def env(self, prefix: str, files_root: Path, batch_size: int, engine_s: float = 0.0,
            write_behind: bool = True) -> dict[str, str]:
        env = {"REDIS_URL": self.redis_url, "EGM_QUEUE_PREFIX": prefix, "EGM_ENGINE": "scripted",
               "EGM_BULK_BATCH_SIZE": str(batch_size), "EGM_LOCAL_FILES_ROOT": str(files_root),
               "EGM_LOG_LEVEL": "WARNING", "EGM_LOG_FORMAT": "json", "EGM_HEARTBEAT_S": "5",
               "EGM_WRITE_BEHIND": "true" if write_behind else "false"}
        if engine_s:
            env.update({"EGM_SCRIPTED_DELAY_S": str(engine_s), "EGM_BATCH_SIZE": str(batch_size)})
        if self.ls is not None:
            env.update({"LABEL_STUDIO_URL": self.ls.url, "LABEL_STUDIO_API_KEY": self.ls.token})
        return env

    # -- one measurement ------------------------------------------------------------------
    def images(self, folder: Path) -> dict[str, bytes]:
        self.seed += 1  # fresh images every run: no cache hits, every task goes through the engine
        return {f"i{i:05d}.png": image_bytes(i, seed=100 + self.seed) for i in range(self.args.tasks)}

    def run(self, mode: str, workers: int, batch_size: int, engine_s: float = 0.0, write_behind: bool = True) -> dict:
        prefix = f"bench{self.seed}-{mode[:2]}{workers}"
        if mode == "label_studio":
            pid = self.ls.create_project(BOXES_CONFIG)
            urls = self.ls.add_local_files(pid, self.images(self.ls.local_files_root))
            self.ls.import_tasks(pid, [{"image": u} for u in urls.values()])
            root, source = self.ls.local_files_root, {"project": pid}
        else:
            root = self.workdir / f"data{self.seed}"
            root.mkdir(parents=True)
            for name, data in self.images(root).items():
                (root / name).write_bytes(data)
            source = {"folder": root, "out": self.workdir / f"out{self.seed}"}
        env = self.env(prefix, root, batch_size, engine_s, write_behind)
        procs = [processes.spawn(["worker", "--name", f"{prefix}-w{i}"], env, self.workdir / f"{prefix}-w{i}.log")
                 for i in range(workers)]
        try:
            version = self._wait_for_workers(env, workers)
            cpu0 = self._cpu(procs)
            result = self._time_run(mode, source, env, version)
            cpu1 = self._cpu(procs)
        finally:
            for p in procs:
                processes.stop(p)
        n = result["tasks"]
        result.update(mode=mode, workers=workers, batch_size=batch_size, engine_s=engine_s, write_behind=write_behind,
                      **{f"{k}_cpu_ms_per_task": round(1000 * (cpu1[k] - cpu0[k]) / n, 3) for k in cpu0})
        return result

    def _cpu(self, workers) -> dict[str, float]:
        """CPU seconds used so far by the workers, this process (the planner) and redis-server."""
        from redis import Redis

        tick = os.sysconf("SC_CLK_TCK")
        worker_s = 0.0
        for proc in workers:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            worker_s += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        info = Redis.from_url(self.redis_url).info("cpu")
        return {"worker": worker_s, "planner": time.process_time(),
                "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"])}

    def _wait_for_workers(self, env: dict, n: int) -> str:
        """Wait until ``n`` workers are ready (fleet registry); the model_version they serve."""
        from redis import Redis

        from egm.fleet import Fleet

        fleet = Fleet(Redis.from_url(self.redis_url), env["EGM_QUEUE_PREFIX"])
        return fleet.wait_for_ready(60, poll_s=0.1, accept=lambda v: len(v.ready) >= n).current_version()

    def _time_run(self, mode: str, source: dict, env: dict, version: str) -> dict:
        """Plan and follow the run in this process (as `prelabel` does), timing it without interpreter start-up."""
        from egm.config.settings import reload_settings
        from egm.bulk.runner import BulkRun, label_studio_spec, local_spec, local_target

        os.environ.update(env)
        settings = reload_settings()
        started = time.perf_counter()
        if mode == "label_studio":
            client = self.ls.client()
            spec = label_studio_spec(settings, client, source["project"], version)
        else:
            client = None
            spec = local_spec(settings, source=source["folder"], source_kind="folder", files_root=source["folder"],
                              out_dir=source["out"], target=local_target(["circle", "square"]),
                              model_version=version)
        run = BulkRun(settings, spec, client=client, poll_s=0.05)
        plan = run.start()
        planned = time.perf_counter()
        outcome = run.finish(run.follow(timeout_s=600))
        wall = time.perf_counter() - started
        done = outcome.progress.done
        if done != self.args.tasks or outcome.failed:
            raise RuntimeError(f"run incomplete ({done} done, {len(outcome.failed)} failed): see {self.workdir}")
        return {"tasks": done, "wall_s": round(wall, 3), "plan_s": round(planned - started, 3),
                "jobs": len(plan.enqueued_jobs)}


READING = """Columns: *wall ms/task* = wall time / tasks (all workers together); *worker busy ms/task* =
wall x workers / tasks, the time a worker spends per task when the engine takes none (with one
worker per GPU, the time its GPU would wait); *CPU ms/task* = CPU time of the worker processes,
the planner/follower (this process) and redis-server per task: what the pipeline itself costs.
Label Studio's own CPU is not counted (it shares the machine's cores with everything else).
"""


def summarize(rows: list[dict]) -> list[dict]:
    for r in rows:
        if r.get("engine_s"):
            # the engine alone: every worker busy all the time, batch_size images per engine_s
            r["engine_tasks_per_s"] = round(r["workers"] * r["batch_size"] / r["engine_s"], 2)
            r["e2e_over_engine"] = round(r["tasks"] / r["wall_s"] / r["engine_tasks_per_s"], 3)
            run_s = r["wall_s"] - r["plan_s"]  # without listing and enqueueing (once per run)
            r["e2e_over_engine_after_planning"] = round(r["tasks"] / run_s / r["engine_tasks_per_s"], 3)
        r["tasks_per_s"] = round(r["tasks"] / r["wall_s"], 1)
        r["wall_ms_per_task"] = round(1000 * r["wall_s"] / r["tasks"], 2)
        # time each worker was busy per task when the engine takes none: the GPU's idle time per task
        r["worker_busy_ms_per_task"] = round(1000 * r["wall_s"] * r["workers"] / r["tasks"], 2)
        r["pipeline_cpu_ms_per_task"] = round(r["worker_cpu_ms_per_task"] + r["planner_cpu_ms_per_task"]
                                              + r["redis_cpu_ms_per_task"], 3)
    return rows


def engine_table(rows: list[dict]) -> str:
    lines = ["| source | batch | engine s/batch | write-behind | workers | tasks | wall s | tasks/s | engine only tasks/s "
             "| e2e / engine | same, after planning |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['engine_s']} | {'on' if r['write_behind'] else 'off'} | "
                     f"{r['workers']} | {r['tasks']} | {r['wall_s']:.2f} | {r['tasks_per_s']:.1f} | "
                     f"{r['engine_tasks_per_s']:.1f} | {r['e2e_over_engine']:.0%} | "
                     f"{r['e2e_over_engine_after_planning']:.0%} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| source | batch | workers | tasks | wall s | tasks/s | wall ms/task | worker busy ms/task | "
             "CPU ms/task: worker + planner + redis = total |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['workers']} | {r['tasks']} | {r['wall_s']:.2f} | "
                     f"{r['tasks_per_s']:.1f} | {r['wall_ms_per_task']:.2f} | {r['worker_busy_ms_per_task']:.2f} | "
                     f"{r['worker_cpu_ms_per_task']:.2f} + {r['planner_cpu_ms_per_task']:.2f} + "
                     f"{r['redis_cpu_ms_per_task']:.2f} = {r['pipeline_cpu_ms_per_task']:.2f} |")
    return "\n".join(lines)



def main() -> int:
    args = parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    engine_seconds = {int(b): float(sec) for b, sec in (x.split(":") for x in args.engine_seconds.split(",") if x)}
    batch_sizes = list(engine_seconds) or [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    behind = [w.strip() == "on" for w in args.write_behind.split(",") if w.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="egm-bench-pipeline-"))
    bench = Bench(args, workdir)
    rows = []
    try:
        bench.start(need_ls="label_studio" in modes)
        for mode in modes:
            for batch_size in batch_sizes:
                for workers in counts:
                    for wb in behind:
                        engine_s = engine_seconds.get(batch_size, 0.0)
                        best = min((bench.run(mode, workers, batch_size, engine_s, wb) for _ in range(args.repeats)),
                                   key=lambda r: r["wall_s"])
                        rows.append(best)
                        print(f"{mode:13} batch={batch_size:<3} workers={workers} engine={engine_s}s "
                              f"write-behind={'on' if wb else 'off'}  {best['tasks']} tasks in {best['wall_s']:.2f} s",
                              flush=True)
    finally:
        bench.stop()
    rows = summarize(rows)
    simulated = bool(engine_seconds)
    meta = {"machine": args.machine, "cpus": os.cpu_count(), "cpu": cpu_model(),
            "gpu": "none (engine time simulated)" if simulated else "none needed (no-op engine)",
            "python": platform.python_version(), "tasks": args.tasks,
            "engine": (f"scripted, sleeping the GPU batch time per call: {args.engine_seconds}" if simulated
                       else "scripted (no-op)"), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "note": "wall = start of a prelabel run (task listing, planning, enqueue) to every prediction written "
                    "(Label Studio) or collected (local); workers already running; Label Studio, Redis, workers "
                    "and the planner share the machine."}
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"pipeline-{args.machine}" + ("-engine" if simulated else "")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tables = (engine_table(rows) + "\n\n" if simulated else "") + table(rows)
    md = (f"# Bulk pipeline benchmark ({args.machine})\n\n"
          + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + tables + "\n\n" + READING)
    (out / f"{name}.md").write_text(md)
    print("\n" + tables)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
