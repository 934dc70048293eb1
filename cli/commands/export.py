"""``egm-assist export``: accepted Label Studio annotations -> SFT / GRPO / COCO data + correction report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from egm.cli.commands._common import settings_from_flags
from egm.cli.errors import EXIT_USAGE, fail, missing_key

FORMAT_CHOICES = ("sft", "grpo", "coco", "all")
#: egm.export.grpo.GRPO_IMAGE_MODES, default first (not imported here: it pulls in pyarrow at every CLI start)
GRPO_IMAGES = ("bytes", "file")


def register(sub) -> None:
    p = sub.add_parser("export", help="export accepted annotations as SFT/GRPO/COCO training data, "
                                      "with a correction report (docs/export.md)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--format", action="append", choices=FORMAT_CHOICES,
                   help="sft, grpo, coco or all (repeatable; default all). The report is always written")
    p.add_argument("--from-predictions", action="store_true",
                   help="only annotations that started from a prediction (parent_prediction)")
    p.add_argument("--model-version", action="append", default=[],
                   help="only annotations started from a prediction of this model_version (repeatable); "
                        "'current' is the model_version the live workers serve")
    p.add_argument("--require-review", choices=["auto", "yes", "no"], default="auto",
                   help="only review-approved annotations: auto = when the export carries review data")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images in the val split (0.1)")
    p.add_argument("--split-seed", default="egm", help="seed of the deterministic train/val split")
    p.add_argument("--images", choices=["copy", "link"], default="copy",
                   help="copy images, or hard/soft-link local files (EXIF-rotated ones are always re-written upright)")
    p.add_argument("--corrected-reasoning", choices=["answer-only", "rationale"], default="answer-only",
                   help="reasoning of samples a human corrected: none (answer-only, default) or a rationale "
                        "written by the running workers")
    p.add_argument("--rationale-timeout", type=float, default=600.0,
                   help="seconds to wait for worker rationales before leaving the rest answer-only")
    p.add_argument("--grpo-single-only", action="store_true",
                   help="GRPO: only rows with exactly one box (EGM's own setting)")
    p.add_argument("--grpo-images", choices=GRPO_IMAGES, default=GRPO_IMAGES[0],
                   help="GRPO: how rows carry their image, as verl reads it: bytes = the encoded file inside "
                        "the parquet (default; self-contained), file = {'image': 'file:///abs/path'} (small "
                        "parquet, the export folder must stay where it is)")
    p.add_argument("--ls-url", help="Label Studio URL (LABEL_STUDIO_URL)")
    p.add_argument("--ls-key", help="Label Studio API key (LABEL_STUDIO_API_KEY)")
    # the option's earlier name, still accepted
    p.add_argument("--label-studio-url", dest="ls_url", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    settings = settings_from_flags(LABEL_STUDIO_URL=args.ls_url, LABEL_STUDIO_API_KEY=args.ls_key)
    from egm.export.exporter import ExportError, ExportOptions, run_export
    from egm.labelstudio import LabelStudioClient, LabelStudioError

    if not 0.0 <= args.val_fraction < 1.0:
        return fail("--val-fraction must be in [0, 1)", EXIT_USAGE)
    if settings.label_studio_api_key is None:
        return missing_key("export")
    formats = _formats(args.format)
    try:
        versions = tuple(_resolve_version(v, settings) for v in args.model_version)
    except Exception as exc:  # noqa: BLE001 - no live worker, Redis unreachable: one line
        return fail(f"--model-version current: {exc}")
    options = ExportOptions(
        project_id=args.project, out_dir=args.out, formats=formats, only_from_predictions=args.from_predictions,
        model_versions=versions, require_review=args.require_review,
        val_fraction=args.val_fraction, split_seed=args.split_seed, image_mode=args.images,
        corrected_reasoning=args.corrected_reasoning, rationale_timeout_s=args.rationale_timeout,
        grpo_single_only=args.grpo_single_only, grpo_images=args.grpo_images)
    try:
        with LabelStudioClient.from_settings(settings) as client:
            result = run_export(client, settings, options)
    except (ExportError, LabelStudioError) as exc:
        return fail(str(exc))
    print(json.dumps(_summary(result.report, result.out_dir), indent=2))
    return 0


def _resolve_version(value: str, settings) -> str:
    """'current' is the version the live workers serve (egm.fleet), the one new predictions are made with."""
    if value == "current":
        from egm.fleet import Fleet
        from egm.queue import connect

        return Fleet.from_settings(settings, connect(settings)).current_version()
    return value


def _formats(chosen: list[str] | None) -> tuple[str, ...]:
    if not chosen or "all" in chosen:
        return ("sft", "grpo", "coco")
    return tuple(dict.fromkeys(chosen))


def _summary(report: dict, out_dir: Path) -> dict:
    overall = report["corrections"]["overall"]
    return {"out": str(out_dir), "annotations": report["annotations"]["by_status"],
            "tasks_exported": report["tasks"]["exported"], "samples": report["samples"]["total"],
            "datasets": report["datasets"], "acceptance_rate": overall["acceptance_rate"],
            "mean_iou": overall["mean_iou"], "warnings": len(report["warnings"])}
