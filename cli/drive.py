"""What ``prelabel`` and ``retry`` share on the command line: local workers, the model version, driving a
run, the summary.

A run is planned for the ``model_version`` the live workers serve (egm.fleet), so the command first
waits for a ready worker: its own ``--local-workers`` (whose death, or ``failed`` record, ends the
command within seconds with the worker's reason) or the fleet's (giving up after
``EGM_WORKER_WAIT_S`` without any). While it follows the run it keeps watching: a local worker that
exits, or no live worker at all for ``EGM_WORKER_WAIT_S``, ends the command with one line saying so.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from egm.config.settings import Settings
from egm import processes
from egm.bulk.progress import ProgressPrinter, format_duration
from egm.bulk.runner import BulkRun, RunOutcome
from egm.fleet import Fleet, FleetError, FleetView, NoLiveWorker, WorkerState
from egm.queue import connect
from egm.bulk.run_store import RunProgress, RunState

from egm.cli.errors import (EXIT_ERROR, EXIT_FAILED_TASKS, EXIT_INTERRUPTED, EXIT_NOT_DONE, EXIT_OK,  # noqa: F401
                            EXIT_TERMINATED, EXIT_USAGE, Terminated)


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
    #: plan for this model_version (``prelabel --model-version``, ``retry``); a live worker must serve it.
    pinned_version: str | None = None
    #: said after the refusal when no live worker serves the pinned version.
    pin_hint: str = ""
    #: seconds between "still waiting for a worker" lines.
    wait_report_s: float = 10.0


class WorkerDied(RuntimeError):
    """A worker this command started exited; the message is its reason."""


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def check_alive(name: str, proc, log_path: Path, view: FleetView | None = None) -> None:
    """Raise :class:`WorkerDied` with the worker's own reason (its ``failed`` record, else the last line
    of its log) when the worker process ``proc`` has exited."""
    code = proc.poll()
    if code is None:
        return
    record = next((w for w in view.workers if w.worker == name), None) if view is not None else None
    if record is not None and record.state == WorkerState.failed and record.reason:
        reason = record.reason
    else:
        reason = last_line(log_path).removeprefix("error: ") or f"exit code {code}"
    raise WorkerDied(f"worker {name} exited (code {code}): {reason} (log: {log_path})")


class LocalWorkers:
    """``--local-workers N``: N ``egm-assist worker`` processes for the length of the command."""

    def __init__(self, settings: Settings, n: int, env: dict[str, str], log_dir: Path,
                 devices: list[str] | None = None) -> None:
        self.settings, self.n, self.env, self.log_dir = settings, n, env, log_dir
        self.devices = devices or []
        self.procs: dict[str, object] = {}

    def __enter__(self) -> "LocalWorkers":
        base = {**self.settings.environment(), "REDIS_URL": self.settings.redis_url,
                "EGM_QUEUE_PREFIX": self.settings.queue_prefix, **self.env}
        for i in range(self.n):
            env = dict(base)
            if self.devices:
                env["EGM_DEVICE"] = self.devices[i % len(self.devices)]
            name = f"prelabel-{os.getpid()}-{i}"
            self.procs[name] = processes.spawn(["worker", "--name", name], env, self.log_dir / f"{name}.log")
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():  # warm shutdown: each finishes its current batch
            processes.stop(proc)

    def check(self, view: FleetView | None = None) -> None:
        """Raise :class:`WorkerDied` with the worker's own reason when one of ours has exited."""
        for name, proc in self.procs.items():
            check_alive(name, proc, self.log_dir / f"{name}.log", view)

    def ready_versions(self, view: FleetView) -> list[str]:
        """Versions our ready workers serve, newest first."""
        versions = {w.model_version for w in view.ready if w.worker in self.procs and w.model_version}
        return sorted(versions, key=lambda v: -view.first_seen.get(v, view.now))


def model_source(settings: Settings) -> str:
    """Where local workers get their model from, in words (a hub download can take minutes, or fail)."""
    if settings.engine in ("hf", "vllm"):
        if settings.model_dir:
            return f"{settings.engine} engine, MODEL_DIR {settings.model_dir}"
        return f"{settings.engine} engine, {settings.model_id} from the Hugging Face Hub: MODEL_DIR is unset"
    if settings.engine == "openai":
        from egm.redaction import redact

        return f"openai engine, model server {redact(settings.openai_base_url)}"
    return f"{settings.engine} engine"


def choose_version(settings: Settings, options: DriveOptions, printer: ProgressPrinter,
                   workers: LocalWorkers | None = None) -> str:
    """Wait for a ready worker (ours when we started some) and return the version to plan for."""
    fleet = Fleet.from_settings(settings, connect(settings))
    last_report = [time.monotonic()]

    def check(view: FleetView) -> None:
        if workers is not None:
            workers.check(view)

    def report(view: FleetView, waited: float) -> None:
        if time.monotonic() - last_report[0] < options.wait_report_s:
            return
        last_report[0] = time.monotonic()
        loading = view.by_state(WorkerState.starting)
        if loading:
            printer.message(f"waiting for {len(loading)} worker(s) to load the model ({waited:.0f} s)")
        else:
            printer.message(f"no live worker for {waited:.0f} s (gives up after {settings.worker_wait_s:.0f} s, "
                            f"EGM_WORKER_WAIT_S): start 'egm-assist worker' or pass --local-workers N")

    accept = (lambda view: bool(workers.ready_versions(view))) if workers is not None else None
    view = fleet.wait_for_ready(settings.worker_wait_s, start_timeout_s=settings.worker_start_timeout_s,
                                on_wait=report, check=check, accept=accept)
    if options.pinned_version or workers is None:
        return view.version_for_planning(settings, options.pinned_version)
    return view.version_for_planning(settings, workers.ready_versions(view)[0])


class FleetWatch:
    """Called while a run is followed: ends the command when its workers are gone."""

    def __init__(self, settings: Settings, run: BulkRun, printer: ProgressPrinter,
                 workers: LocalWorkers | None, report_s: float = 10.0) -> None:
        self.settings, self.run, self.printer, self.workers = settings, run, printer, workers
        self.fleet = Fleet.from_settings(settings, run.queue.redis)
        self.none_since: float | None = None
        self.reported_at = 0.0
        self.report_s = report_s
        self.told_other_version = False

    def __call__(self) -> None:
        view = self.fleet.view()
        if self.workers is not None:
            self.workers.check(view)
        live = view.live_versions()
        if live:
            self.none_since = None
        else:
            self.none_since = self.none_since or time.monotonic()
            seen_none = time.monotonic() - self.none_since
            if seen_none >= self.settings.worker_wait_s:
                raise NoLiveWorker(f"no live worker for {seen_none:.0f} s (EGM_WORKER_WAIT_S): "
                                   f"{view.no_worker_message()}; the run's batches stay queued: start a worker and "
                                   f"run the same command again")
            if seen_none and time.monotonic() - self.reported_at >= self.report_s:
                self.reported_at = time.monotonic()
                self.printer.message(f"no live worker for {seen_none:.0f} s (gives up after "
                                     f"{self.settings.worker_wait_s:.0f} s, EGM_WORKER_WAIT_S)")
        version = self.run.spec.model_version
        if live and version not in live and not self.told_other_version:
            self.told_other_version = True
            self.printer.message(
                f"note: no live worker serves this run's model_version {version} any more (live: "
                f"{', '.join(sorted(live))}); its queued batches fail after EGM_VERSION_WAIT_S "
                f"({self.settings.version_wait_s:.0f} s) unless one comes back. Run 'egm-assist prelabel' again to "
                f"plan a new run for the live version")


def drive(make_run: Callable[[str], BulkRun], settings: Settings, options: DriveOptions, printer: ProgressPrinter,
          out=None) -> int:
    """Find the model version (starting local workers first if asked), then plan the run, follow it, finish it;
    returns the command's exit code. ``make_run(model_version)`` builds the run."""
    out = out or sys.stdout
    if options.local_workers > 0:
        log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="egm-prelabel-"))
        printer.message(f"starting {options.local_workers} local worker(s) ({model_source(settings)}); "
                        f"logs in {log_dir}")
        with LocalWorkers(settings, options.local_workers, options.worker_env, log_dir, options.devices) as workers:
            return _with_version(make_run, settings, options, printer, out, workers)
    return _with_version(make_run, settings, options, printer, out, None)


def _with_version(make_run, settings: Settings, options: DriveOptions, printer: ProgressPrinter, out,
                  workers: LocalWorkers | None) -> int:
    try:
        version = choose_version(settings, options, printer, workers)
    except (FleetError, WorkerDied) as exc:
        printer.close()
        hint = f" ({options.pin_hint})" if options.pin_hint and options.pinned_version else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        printer.close()
        print(f"\n{_stopped(exc)} while waiting for a worker: nothing was planned", file=sys.stderr)
        return _interrupt_code(exc)
    run = make_run(version)
    return _drive(run, options, printer, out, FleetWatch(settings, run, printer, workers, options.wait_report_s))


def _drive(run: BulkRun, options: DriveOptions, printer: ProgressPrinter, out, watch=None) -> int:
    try:
        plan = run.start(retry_failed=options.retry_failed, set_project_version=options.set_project_version)
        printer.message(f"run {run.run_id}: {plan.total} tasks - {plan.enqueued_tasks} enqueued in "
                        f"{len(plan.enqueued_jobs)} batches, {plan.skipped} already predicted, {plan.done} done "
                        f"before, {plan.in_flight} in flight, {plan.failed_kept} failed before"
                        + (" (retry them: --retry-failed)" if plan.failed_kept else ""))
        if not options.wait:
            printer.message(f"follow it with: egm-assist status {run.run_id} --watch")
            return EXIT_OK
        progress = run.follow(timeout_s=options.timeout_s, watch=watch)
    except (WorkerDied, NoLiveWorker) as exc:
        printer.close()
        print(f"error: {exc}; run {run.run_id} resumes with the same command (egm-assist status {run.run_id})",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        printer.close()
        where = ("wait in Redis for workers (the local ones stop now)" if options.local_workers
                 else "keep running on the workers")
        print(f"\n{_stopped(exc)}: batches already queued {where}.\n"
              f"  resume:  run the same command again\n"
              f"  status:  egm-assist status {run.run_id}\n"
              f"  cancel:  egm-assist cancel {run.run_id}", file=sys.stderr)
        return _interrupt_code(exc)
    except TimeoutError as exc:
        printer.close()
        print(f"{exc}; it goes on in the workers: egm-assist status {run.run_id}", file=sys.stderr)
        return EXIT_NOT_DONE
    printer.close(progress)
    outcome = run.finish(progress, set_project_version=options.set_project_version)
    print_summary(outcome, run.run_id, options, out)
    if outcome.progress.state == RunState.cancelled or not outcome.complete:
        return EXIT_NOT_DONE
    return EXIT_FAILED_TASKS if outcome.failed else EXIT_OK


def _stopped(exc: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def _interrupt_code(exc: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


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
