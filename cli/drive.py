"""What ``prelabel`` and ``retry`` share on the command line: local workers, driving a run, the summary."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from egm.config.settings import Settings
from egm import processes
from egm.bulk.progress import ProgressPrinter, format_duration
from egm.bulk.runner import BulkRun, RunOutcome
from egm.runs import RunProgress

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_TASKS, EXIT_NOT_DONE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


@dataclass
class DriveOptions:
    wait: bool = True
    timeout_s: float | None = None
    retry_failed: bool = False
    set_project_version: bool = True
    as_json: bool = False
    failed_limit: int = 20
    local_workers: int = 0
    devices: list[str] = field(default_factory=list)
    #: extra environment for local workers (EGM_LOCAL_FILES_ROOT of local runs).
    worker_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None


class LocalWorkers:
    """``--local-workers N``: N ``egm-assist worker`` processes for the length of the command."""

    def __init__(self, settings: Settings, n: int, env: dict[str, str], log_dir: Path,
                 devices: list[str] | None = None) -> None:
        self.settings, self.n, self.env, self.log_dir = settings, n, env, log_dir
        self.devices = devices or []
        self.procs = []

    def __enter__(self) -> "LocalWorkers":
        base = {"REDIS_URL": self.settings.redis_url, "EGM_QUEUE_PREFIX": self.settings.queue_prefix, **self.env}
        for i in range(self.n):
            env = dict(base)
            if self.devices:
                env["EGM_DEVICE"] = self.devices[i % len(self.devices)]
            name = f"prelabel-{os.getpid()}-{i}"
            self.procs.append(processes.spawn(["worker", "--name", name], env, self.log_dir / f"{name}.log"))
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:  # warm shutdown: each finishes its current batch
            processes.stop(proc)


def drive(run: BulkRun, options: DriveOptions, printer: ProgressPrinter, out=None) -> int:
    """Plan the run, follow it, finish it; returns the command's exit code."""
    out = out or sys.stdout
    if options.local_workers > 0:
        log_dir = options.log_dir or Path(tempfile.gettempdir()) / f"egm-{run.run_id}"
        printer.message(f"starting {options.local_workers} local worker(s); logs in {log_dir}")
        with LocalWorkers(run.settings, options.local_workers, options.worker_env, log_dir, options.devices):
            return _drive(run, options, printer, out)
    return _drive(run, options, printer, out)


def _drive(run: BulkRun, options: DriveOptions, printer: ProgressPrinter, out) -> int:
    try:
        plan = run.start(retry_failed=options.retry_failed)
        printer.message(f"run {run.run_id}: {plan.total} tasks - {plan.enqueued_tasks} enqueued in "
                        f"{len(plan.enqueued_jobs)} batches, {plan.skipped} already predicted, {plan.done} done "
                        f"before, {plan.in_flight} in flight, {plan.failed_kept} failed before"
                        + (" (retry them: --retry-failed)" if plan.failed_kept else ""))
        if not options.wait:
            printer.message(f"follow it with: egm-assist status {run.run_id} --watch")
            return EXIT_OK
        progress = run.follow(timeout_s=options.timeout_s)
    except KeyboardInterrupt:
        printer.close()
        where = ("wait in Redis for workers (the local ones stop now)" if options.local_workers
                 else "keep running on the workers")
        print(f"\ninterrupted: batches already queued {where}.\n"
              f"  resume:  run the same command again\n"
              f"  status:  egm-assist status {run.run_id}\n"
              f"  cancel:  egm-assist cancel {run.run_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TimeoutError as exc:
        printer.close()
        print(f"{exc}; it goes on in the workers: egm-assist status {run.run_id}", file=sys.stderr)
        return EXIT_NOT_DONE
    printer.close(progress)
    outcome = run.finish(progress, set_project_version=options.set_project_version)
    print_summary(outcome, run.run_id, options, out)
    if outcome.progress.state == "cancelled" or not outcome.complete:
        return EXIT_NOT_DONE
    return EXIT_FAILED_TASKS if outcome.failed else EXIT_OK


def summary_line(p: RunProgress) -> str:
    return (f"{p.total} tasks: {p.done} predicted ({p.cached} from cache), {p.skipped} skipped (already "
            f"predicted), {p.failed} failed" + (f", {p.retrying} retrying" if p.retrying else "")
            + (f", {p.remaining} remaining" if p.remaining else ""))


def format_failed(failed: list[dict], limit: int) -> list[str]:
    lines = []
    for item in failed[:limit]:
        who = f"task {item['task_id']}" if item.get("task_id") is not None else str(item.get("ref"))
        lines.append(f"  {who}: [{item.get('kind') or 'error'}] {item.get('error')}")
    if len(failed) > limit:
        lines.append(f"  ... and {len(failed) - limit} more (egm-assist status RUN --failed {len(failed)})")
    return lines


def print_summary(outcome: RunOutcome, run_id: str, options: DriveOptions, out) -> None:
    p = outcome.progress
    if options.as_json:
        out.write(json.dumps({"run_id": run_id, "progress": p.as_dict(), "complete": outcome.complete,
                              "failed": outcome.failed, "outputs": outcome.outputs}, indent=1) + "\n")
        return
    lines = [f"run {run_id} {p.state}: {summary_line(p)}",
             f"  {format_duration(max(0.0, p.updated_at - (p.resumed_at or p.started_at)))} this time, "
             f"{p.rate:.1f} tasks/s"]
    if outcome.failed:
        lines.append(f"failed tasks ({len(outcome.failed)}):")
        lines += format_failed(outcome.failed, options.failed_limit)
        lines.append(f"retry them: egm-assist retry {run_id}")
    for name, path in outcome.outputs.items():
        lines.append(f"{name}: {path}")
    out.write("\n".join(lines) + "\n")
