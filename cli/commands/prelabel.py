"""``egm-assist prelabel``: pre-annotate a whole Label Studio project, a folder or a manifest.

Resumable and idempotent: the same command again skips what is done or in flight.
See docs/bulk.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from egm.cli.errors import service_errors
from egm.cli.commands._common import add_follow_args, settings_from_flags


def register(sub) -> None:
    p = sub.add_parser("prelabel", help="pre-annotate a Label Studio project, a folder or a manifest (bulk, resumable)",
                       description="Pre-annotate a whole Label Studio project, a folder or a manifest of images. "
                                   "Resumable: the same command again skips what is done or in flight. The model "
                                   "runs in workers: start them with 'egm-assist worker' (MODEL_DIR set to the "
                                   "checkpoint) or pass --local-workers N.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--project", type=int, help="Label Studio project id (writes predictions to it)")
    src.add_argument("--folder", type=Path, help="folder of images (no Label Studio needed)")
    src.add_argument("--manifest", type=Path, help="image list: .txt, .jsonl, .json or .csv (no Label Studio needed)")
    ls = p.add_argument_group("Label Studio source")
    ls.add_argument("--view", type=int, help="only the tasks of this Data Manager view (tab) id")
    ls.add_argument("--filter", dest="filters", help="Data Manager filters as JSON, e.g. "
                    '\'{"conjunction":"and","items":[{"filter":"filter:tasks:total_annotations",'
                    '"operator":"equal","type":"Number","value":0}]}\'')
    ls.add_argument("--ls-url", help="Label Studio URL (LABEL_STUDIO_URL)")
    ls.add_argument("--ls-key", help="Label Studio API key (LABEL_STUDIO_API_KEY)")
    ls.add_argument("--keep-project-version", action="store_true",
                    help="do not switch the project's model version to this run's (default: switch, so Label "
                         "Studio shows and scores these predictions)")
    local = p.add_argument_group("folder / manifest source")
    local.add_argument("--labels", help="comma-separated labels to find, e.g. 'person,car'")
    local.add_argument("--label-config", type=Path, help="labeling config XML: labels and control names")
    local.add_argument("--out", type=Path, help="output folder (default out/<run id>)")
    local.add_argument("--root", type=Path, help="folder image paths are relative to; workers need "
                       "EGM_LOCAL_FILES_ROOT set to it (default: EGM_LOCAL_FILES_ROOT, else the folder / "
                       "the manifest's folder)")
    local.add_argument("--image-url-prefix", default="",
                       help="put before each relative path in the Label Studio import file, e.g. "
                            "'/data/local-files/?d=images/'")
    run = p.add_argument_group("run")
    run.add_argument("--model-version", help="plan for this model_version; a live worker must serve it (default: "
                     "the version the live workers serve, egm-assist status lists them)")
    run.add_argument("--batch-size", type=int, help="tasks per batch job (EGM_BULK_BATCH_SIZE, default 64)")
    run.add_argument("--local-workers", type=int, default=0,
                     help="start N workers for this command (default 0: use the workers already running)")
    run.add_argument("--devices", help="devices for --local-workers, one per worker in turn, e.g. cuda:0,cuda:1")
    run.add_argument("--engine", choices=["hf", "vllm", "openai", "scripted"], help="engine of --local-workers")
    run.add_argument("--retry-failed", action="store_true", help="also retry tasks that failed in an earlier run")
    add_follow_args(run)
    p.set_defaults(func=run_command)


@service_errors
def run_command(args) -> int:
    from egm.bulk.progress import ProgressPrinter
    from egm.bulk.runner import BulkRun
    from egm.cli.drive import EXIT_ERROR, EXIT_USAGE, DriveOptions, drive
    from egm.bulk.sources import SourceError

    settings = settings_from_flags(LABEL_STUDIO_URL=args.ls_url, LABEL_STUDIO_API_KEY=args.ls_key,
                                   EGM_BULK_BATCH_SIZE=args.batch_size, EGM_ENGINE=args.engine)
    printer = ProgressPrinter(enabled=not args.quiet)
    options = DriveOptions(wait=not args.no_wait, timeout_s=args.timeout, retry_failed=args.retry_failed,
                           set_project_version=not args.keep_project_version, as_json=args.json,
                           local_workers=args.local_workers,
                           devices=[d.strip() for d in (args.devices or "").split(",") if d.strip()])
    options.pinned_version = args.model_version
    # The source is read and checked before any worker is awaited; the run's version (and with it its id and
    # default output folder) comes from the workers afterwards.
    try:
        if args.project is not None:
            spec, client = _label_studio_spec(settings, args, "")
        else:
            spec, client = _local_spec(settings, args, ""), None
            options.worker_env["EGM_LOCAL_FILES_ROOT"] = spec.files_root
            if args.out:
                options.log_dir = args.out.resolve() / "logs"
            _check_files_root(settings, spec, printer, args.local_workers)
    except (ValueError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - unreachable services: a message, not a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR

    def make_run(model_version: str) -> BulkRun:
        versioned = spec.for_version(model_version)
        if versioned.kind == "local" and not args.out:
            versioned = versioned.model_copy(update={"out_dir": str((Path("out") / versioned.run_id).resolve())})
        return BulkRun(settings, versioned, client=client, printer=printer)

    return drive(make_run, settings, options, printer)


def _label_studio_spec(settings, args, model_version: str):
    from egm.bulk.runner import label_studio_spec
    from egm.labelstudio import LabelStudioClient

    if settings.label_studio_api_key is None:
        raise ValueError("--project needs Label Studio credentials: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
                         "(or --ls-url / --ls-key); the workers need them too, to write predictions")
    filters = json.loads(args.filters) if args.filters else None
    if filters is not None and not isinstance(filters, dict):
        raise ValueError("--filter must be a JSON object like {\"conjunction\": \"and\", \"items\": [...]}")
    client = LabelStudioClient.from_settings(settings)
    return label_studio_spec(settings, client, args.project, model_version, view_id=args.view,
                             filters=filters), client


def _local_spec(settings, args, model_version: str):
    from egm.bulk.runner import local_spec, local_target

    source = args.folder or args.manifest
    if not source.exists():
        raise ValueError(f"{source} does not exist")
    labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    config = args.label_config.read_text() if args.label_config else None
    target = local_target(labels, config)
    default_root = source if args.folder else source.parent
    root = args.root or (Path(settings.local_files_root) if settings.local_files_root else default_root)
    return local_spec(settings, source=source, source_kind="folder" if args.folder else "manifest",
                      files_root=root, out_dir=args.out or Path("out"), target=target, model_version=model_version,
                      image_url_prefix=args.image_url_prefix)


def _check_files_root(settings, spec, printer, local_workers: int) -> None:
    """Workers read local images only under their EGM_LOCAL_FILES_ROOT: say so before nothing works."""
    if local_workers > 0:
        return  # our own workers get it
    mine = settings.local_files_root
    if not mine or Path(mine).resolve() != Path(spec.files_root):
        printer.message(f"note: image paths are relative to {spec.files_root}; the running workers must have "
                        f"EGM_LOCAL_FILES_ROOT={spec.files_root} (or use --local-workers N)")
