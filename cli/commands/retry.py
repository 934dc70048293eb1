"""``egm-assist retry RUN``: run a bulk run's failed tasks again (and anything left undone)."""

from __future__ import annotations

import sys
from pathlib import Path

from egm.cli.errors import missing_key, service_errors
from egm.cli.commands._common import add_follow_args, open_runs


def register(sub) -> None:
    p = sub.add_parser("retry", help="retry the failed tasks of a bulk run")
    p.add_argument("run", help="run id (egm-assist status lists them)")
    p.add_argument("--local-workers", type=int, default=0, help="start N workers for this command")
    p.add_argument("--ls-url", help="Label Studio URL (LABEL_STUDIO_URL), for runs of a Label Studio project")
    p.add_argument("--ls-key", help="Label Studio API key (LABEL_STUDIO_API_KEY)")
    add_follow_args(p)
    p.set_defaults(func=run_command)


@service_errors
def run_command(args) -> int:
    from egm.bulk.progress import ProgressPrinter
    from egm.bulk.runner import BulkRun
    from egm.cli.drive import EXIT_USAGE, DriveOptions, drive
    from egm.bulk.spec import RunSpec

    settings, queue, runs = open_runs(LABEL_STUDIO_URL=args.ls_url, LABEL_STUDIO_API_KEY=args.ls_key)
    raw = runs.spec(args.run)
    if raw is None:
        print(f"error: no run {args.run!r} with a stored spec (see 'egm-assist status')", file=sys.stderr)
        return EXIT_USAGE
    spec = RunSpec.model_validate(raw)
    client = None
    options = DriveOptions(wait=not args.no_wait, timeout_s=args.timeout, retry_failed=True, as_json=args.json,
                           local_workers=args.local_workers, pinned_version=spec.model_version,
                           pin_hint=f"run {spec.run_id} was planned for it: start a worker serving it, or plan a new "
                                    f"run for the live version with 'egm-assist prelabel'")
    if spec.kind == "label_studio":
        from egm.labelstudio import LabelStudioClient

        if settings.label_studio_api_key is None:
            return missing_key(f"run {spec.run_id} (a Label Studio project's)")
        client = LabelStudioClient.from_settings(settings)
    else:
        options.worker_env["EGM_LOCAL_FILES_ROOT"] = spec.files_root
        options.log_dir = Path(spec.out_dir) / "logs"
    printer = ProgressPrinter(enabled=not args.quiet)
    run = BulkRun(settings, spec, client=client, queue=queue, printer=printer)
    return drive(lambda version: run, settings, options, printer)
