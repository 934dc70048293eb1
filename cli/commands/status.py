"""``egm-assist status [RUN]``: progress of bulk runs, their failed tasks, queues, workers and the
model versions they serve (the fleet registry, egm.fleet)."""

from __future__ import annotations

import json
import time

from egm.cli.errors import EXIT_USAGE, fail, service_errors
from egm.cli.commands._common import open_runs
from egm.bulk.run_store import RunState


def register(sub) -> None:
    p = sub.add_parser("status", help="progress and failed tasks of bulk runs (any process can read them)")
    p.add_argument("run", nargs="?", help="run id (from prelabel); without it, list the runs")
    p.add_argument("--failed", type=int, default=20, metavar="N", help="show up to N failed tasks (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="follow the run with a progress bar until it ends")
    p.set_defaults(func=run_command)


@service_errors
def run_command(args) -> int:

    _, queue, runs = open_runs()
    if not args.run:
        return _list_runs(queue, runs, args)
    progress = runs.progress(args.run)
    if progress is None:
        return fail(f"no run {args.run!r} (see 'egm-assist status' for the list)", EXIT_USAGE)
    if args.watch:
        progress = _watch(runs, args.run)
    return _show_run(queue, runs, progress, args)


def _workers(queue) -> int:
    from egm.fleet import Fleet

    return len(Fleet.from_settings(queue.settings, queue.redis).view().workers)


def fleet_summary(queue) -> dict:
    """Versions (current first), and every live or recently failed worker with its state."""
    from egm.fleet import Fleet, FleetError

    view = Fleet.from_settings(queue.settings, queue.redis).view()
    try:
        current = view.current_version()
    except FleetError:
        current = None
    live = view.live_versions()
    versions = {}
    for version in sorted(set(live) | set(view.last_seen), key=lambda v: -view.first_seen.get(v, 0)):
        versions[version] = {"current": version == current, "ready_workers": len(live.get(version, [])),
                             "first_seen": view.first_seen.get(version), "last_seen": view.last_seen.get(version)}
    return {"current": current, "versions": versions, "now": view.now,
            "workers": [w.model_dump(mode="json") for w in view.workers]}


def _show_run(queue, runs, progress, args) -> int:
    from egm.bulk.progress import format_duration, render
    from egm.bulk.retries import RetryScheduler
    from egm.cli.drive import format_failed, summary_line

    failed = runs.failed(progress.run_id)
    retrying = RetryScheduler(queue).pending(progress.run_id)
    if args.json:
        print(json.dumps({"progress": progress.as_dict(), "failed": failed[:args.failed], "failed_total": len(failed),
                          "retrying": len(retrying), "queues": queue.depths(), "workers": _workers(queue),
                          "fleet": fleet_summary(queue)}, indent=1))
        return 0
    print(f"run {progress.run_id}  [{progress.state}]  {progress.source}  model_version {progress.model_version}")
    print(f"  {render(progress)}")
    print(f"  {summary_line(progress)}")
    if progress.started_at:
        print(f"  started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(progress.started_at))}, "
              f"last update {format_duration(time.time() - progress.updated_at)} ago")
    if retrying:
        print(f"  {len(retrying)} task(s) waiting for a retry, next in "
              f"{format_duration(max(0.0, min(retrying.values()) - time.time()))}")
    if failed:
        print(f"failed tasks ({len(failed)}):")
        print("\n".join(format_failed(failed, args.failed)))
        print(f"retry them: egm-assist retry {progress.run_id}")
    depths = queue.depths()
    print("queues: " + (", ".join(f"{name} {d['queued']} queued / {d['started']} running"
                                  for name, d in depths.items()) or "none") + f"; workers: {_workers(queue)}")
    fleet = fleet_summary(queue)
    if fleet["current"] != progress.model_version:
        now_serving = fleet["current"] or "no live worker"
        print(f"note: this run's model_version is {progress.model_version}; new work goes to {now_serving}. Batches "
              f"of a version no worker serves fail after EGM_VERSION_WAIT_S; 'egm-assist prelabel' again plans a "
              f"new run for the live version")
    return 0


def _list_runs(queue, runs, args) -> int:
    items = [p for p in (runs.progress(r) for r in runs.runs()) if p is not None]
    items.sort(key=lambda p: p.updated_at, reverse=True)
    if args.json:
        print(json.dumps({"runs": [p.as_dict() for p in items], "queues": queue.depths(),
                          "workers": _workers(queue), "fleet": fleet_summary(queue)}, indent=1))
        return 0
    _fleet(queue)
    print("runs:" if items else "runs: none yet (start one with 'egm-assist prelabel')")
    for p in items:
        print(f"  {p.run_id:40} {p.state:10} {p.resolved:>7}/{p.total:<7} failed {p.failed:<5} {p.source}")
    return 0


def _fleet(queue) -> None:
    """Model versions, queues, workers and throughput at a glance."""
    from rq import Worker

    from egm.fleet import ago
    from egm.stats import StatsStore, parse_field

    fleet = fleet_summary(queue)
    depths = queue.depths()
    print("model versions:" if fleet["versions"] else "model versions: none seen yet (start 'egm-assist worker')")
    for version, v in fleet["versions"].items():
        waiting = sum(d["queued"] for d in depths.values() if d["model_version"] == version)
        if v["ready_workers"]:
            state = ("current" if v["current"] else "draining") + f", {v['ready_workers']} worker(s) ready"
        else:
            state = f"no live worker (last seen {ago(fleet['now'] - (v['last_seen'] or 0))})"
        print(f"  {version:40} {state}" + (f"; {waiting} job(s) queued" if waiting else ""))
    print("queues:  " + ("   ".join(f"{name}: {d['queued']} queued, {d['started']} running, {d['failed']} failed"
                                    for name, d in depths.items()) or "none"))
    rq_workers = {w.name: w for w in Worker.all(connection=queue.redis)}
    print(f"workers: {len(fleet['workers'])}")
    for w in sorted(fleet["workers"], key=lambda w: w["worker"]):
        line = f"  {w['worker']:36} {w['state']:9}"
        if w["state"] == "ready":
            r = rq_workers.get(w["worker"])
            line += f" {w['model_version']}"
            if r is not None:
                job = r.get_current_job_id() or "-"
                line += (f"  job {job[:12]:12} done {r.successful_job_count:>6} failed {r.failed_job_count:>4} "
                         f"busy {r.total_working_time:8.1f} s")
        elif w["state"] == "starting":
            line += f" loading the {w['engine']} model since {ago(fleet['now'] - w['started_at'])}"
        else:
            line += f" {w['reason']}"
        print(line)
    stats = StatsStore(queue.redis, queue.prefix)
    totals: dict[str, float] = {}
    for raw, value in stats.snapshot().items():
        name, labels = parse_field(raw)
        if name == "egm_tasks_total":
            totals[labels.get("status", "?")] = totals.get(labels.get("status", "?"), 0) + value
    print(f"tasks:   ok {int(totals.get('ok', 0))}, failed {int(totals.get('failed', 0))}; "
          f"throughput {stats.recent_rate(60):.1f} tasks/s over the last minute")


def _watch(runs, run_id: str):
    from egm.bulk.progress import ProgressPrinter

    printer = ProgressPrinter()
    try:
        while True:
            progress = runs.progress(run_id)
            printer.update(progress)
            if progress.state in (RunState.done, RunState.cancelled) or (progress.remaining == 0 and not progress.retrying):
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    printer.close(progress)
    return progress
