"""``egm-assist cancel RUN``: stop a bulk run cleanly."""

from __future__ import annotations


from egm.cli.errors import EXIT_USAGE, fail, service_errors
from egm.cli.commands._common import open_runs


def register(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a bulk run: its queued batches are dropped, workers skip the rest")
    p.add_argument("run", help="run id (egm-assist status lists them)")
    p.set_defaults(func=run_command)


@service_errors
def run_command(args) -> int:
    from egm.bulk.rq_jobs import cancel_run

    _, queue, runs = open_runs()
    if runs.progress(args.run) is None:
        return fail(f"no run {args.run!r} (see 'egm-assist status')", EXIT_USAGE)
    report = cancel_run(queue, args.run)
    progress = runs.progress(args.run)
    print(f"run {args.run} cancelled: {report['jobs_cancelled']} queued batches dropped, "
          f"{report['retries_dropped']} pending retries dropped; {progress.done} tasks were predicted. "
          f"Batches already running finish. Resume later with the same prelabel command.")
    return 0
