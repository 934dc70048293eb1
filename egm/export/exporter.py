"""``egm-assist export``: Label Studio project -> accepted annotations -> data sets + correction report.

Label Studio is the source of truth: tasks and annotations come from its JSON export,
prediction bodies from its predictions API (the export lists prediction ids only).

Output folder::

    images/               the tasks' images (upright), named by content hash
    sft/{train,val}.jsonl qwen-vl-finetune conversations          (--format sft)
    grpo/{train,val}.parquet + grpo/reward.py   verl rows + reward  (--format grpo)
    coco/{train,val}.json COCO detection                          (--format coco)
    annotations.jsonl     every annotation with its selection status
    corrections.jsonl     every predicted/final box with what the human did to it
    report.json, report.png  correction figures per model_version and label
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from egm.labelstudio.config import LabelingConfig, LabelingConfigError, parse_labeling_config
from egm.config.settings import Settings
from egm.export.accepted import Chosen, ReviewPolicy, Selection, SelectionOptions, select_accepted
from egm.export.coco import CocoImage, write_coco
from egm.export.corrections import (DEFAULT_ACCEPT_TOLERANCE, DEFAULT_MATCH_IOU, Correction, Kind, Tally,
                                    correction_record, match_regions)
from egm.export.grpo import DEFAULT_GRPO_IMAGES, GrpoImages, write_grpo
from egm.export.images import ImageCollector, ImageEntry, ImageMode
from egm.export.rationale import DEFAULT_PROMPT, RationaleClient
from egm.export.regions import parse_result
from egm.export.report import write_report
from egm.export.samples import AnnotationView, Sample, build_samples, split_of
from egm.export.sft import write_sft
from egm.fleet import FleetError
from egm.prompts import load_templates
from egm.queries import TaskDataError, image_of

log = logging.getLogger(__name__)

FORMATS = ("sft", "grpo", "coco")
CorrectedReasoning = Literal["answer-only", "rationale"]


class ExportError(RuntimeError):
    """The export cannot run at all (bad project, unusable labeling config)."""


@dataclass
class ExportOptions:
    project_id: int
    out_dir: Path
    formats: tuple[str, ...] = FORMATS
    only_from_predictions: bool = False
    model_versions: tuple[str, ...] = ()
    require_review: ReviewPolicy = "auto"
    val_fraction: float = 0.1
    split_seed: str = "egm"
    image_mode: ImageMode = "copy"
    #: what a sample whose boxes a human corrected gets as reasoning.
    corrected_reasoning: CorrectedReasoning = "answer-only"
    rationale_timeout_s: float = 600.0
    rationale_prompt: str = DEFAULT_PROMPT
    grpo_single_only: bool = False
    #: how GRPO rows carry their image: encoded bytes in the parquet, or a file:// path.
    grpo_images: GrpoImages = DEFAULT_GRPO_IMAGES
    accept_tolerance: float = DEFAULT_ACCEPT_TOLERANCE
    match_iou: float = DEFAULT_MATCH_IOU


@dataclass
class ExportResult:
    report: dict
    out_dir: Path
    samples: list[Sample] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def run_export(client, settings: Settings, options: ExportOptions, rationale_client: RationaleClient | None = None,
               ) -> ExportResult:
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _labeling_config(client, options.project_id)
    tasks = client.export_annotations(options.project_id)
    predictions = {p.id: p for p in client.list_predictions(project_id=options.project_id)}
    selection = select_accepted(tasks, predictions, SelectionOptions(
        only_from_predictions=options.only_from_predictions, model_versions=tuple(options.model_versions),
        require_review=options.require_review))

    state = _State(config=config, images=ImageCollector(out_dir, settings, client, options.image_mode))
    for chosen in selection.chosen:
        try:
            _one_annotation(chosen, state, options)
        except Exception as exc:  # noqa: BLE001 - one odd annotation must not sink the export
            log.exception("cannot export annotation", extra={"task": chosen.task.id})
            state.warnings.append(f"task {chosen.task.id} annotation {chosen.annotation.id} skipped: "
                                  f"{type(exc).__name__}: {exc}")

    if options.corrected_reasoning == "rationale":
        _ask_rationales(state, settings, config, options, rationale_client)
    for sample in state.samples:
        if not sample.reasoning and sample.model_reasoning:
            sample.reasoning, sample.reasoning_source = sample.model_reasoning, "model"

    templates = load_templates(settings)
    datasets: dict[str, dict] = {}
    if "sft" in options.formats:
        datasets["sft"] = write_sft(state.samples, out_dir, templates)
    if "grpo" in options.formats:
        datasets["grpo"] = write_grpo(state.samples, out_dir, templates, single_only=options.grpo_single_only,
                                      images=options.grpo_images)
        state.warnings += [f"grpo/{split}.parquet not written: no rows (verl cannot read an empty parquet file)"
                           for split, rows in datasets["grpo"].items() if not rows]
    if "coco" in options.formats:
        datasets["coco"] = write_coco(state.coco, config.target.labels, out_dir)
    _write_jsonl(out_dir / "annotations.jsonl", [asdict(d) | {"status": d.status.value}
                                                  for d in selection.decisions])
    _write_jsonl(out_dir / "corrections.jsonl", state.records)

    report = _report(options, selection, state, datasets)
    json_path, png_path = write_report(report, out_dir)
    return ExportResult(report=report, out_dir=out_dir, samples=state.samples,
                        files={"report": str(json_path), "chart": str(png_path)})


@dataclass
class _State:
    config: LabelingConfig
    images: ImageCollector
    tally: Tally = field(default_factory=Tally)
    samples: list[Sample] = field(default_factory=list)
    coco: list[CocoImage] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    measured: int = 0
    without_prediction: int = 0
    image_failures: list[dict] = field(default_factory=list)
    exported_tasks: int = 0


def _labeling_config(client, project_id: int) -> LabelingConfig:
    project = client.get_project(project_id)
    try:
        return parse_labeling_config(project.label_config)
    except LabelingConfigError as exc:
        raise ExportError(f"project {project_id}: {exc}") from None


def _one_annotation(chosen: Chosen, state: _State, options: ExportOptions) -> None:
    target, task, annotation = state.config.target, chosen.task, chosen.annotation
    final_parsed = parse_result(annotation.result, from_name=target.from_name,
                                reasoning_from_name=target.reasoning_from_name)
    for note in final_parsed.notes:
        state.warnings.append(f"task {task.id} annotation {annotation.id}: {note}")
    final = final_parsed.regions
    expressions = final_parsed.text_of(state.config.prompt_from_name) if state.config.prompt_from_name else []

    prediction, version, task_text = chosen.prediction, None, ""
    if annotation.parent_prediction is not None and prediction is None:
        state.warnings.append(f"task {task.id} annotation {annotation.id}: parent prediction "
                              f"{annotation.parent_prediction} no longer exists; not measured")
    if prediction is not None:
        predicted = parse_result(prediction.result, from_name=target.from_name,
                                 reasoning_from_name=target.reasoning_from_name)
        version = prediction.model_version or "(none)"
        corrections = match_regions(predicted.regions, final, accept_tolerance=options.accept_tolerance,
                                    match_iou=options.match_iou)
        state.tally.add(corrections, version)
        state.measured += 1
        task_text = "\n".join(t for name, texts in predicted.texts.items()
                              if name != state.config.prompt_from_name for t in texts)
        context = {"task_id": task.id, "annotation_id": annotation.id, "prediction_id": prediction.id,
                   "model_version": version}
        state.records += [correction_record(c, **context) for c in corrections]
    else:
        state.without_prediction += 1
        corrections = [Correction(Kind.added, None, r) for r in final]

    image = _image(task, state)
    if image is None:
        return
    _check_sizes(task.id, final, image, state)
    split = split_of(image.sha256 or f"task:{task.id}", options.val_fraction, options.split_seed)
    view = AnnotationView(task_id=task.id, annotation_id=annotation.id, final=final, corrections=corrections,
                          image=image, model_version=version, prediction_reasoning=task_text,
                          expressions=expressions)
    for sample in build_samples(view, target.labels):
        sample.split = split
        state.samples.append(sample)
    state.coco.append(CocoImage(task_id=task.id, image=image, regions=final, split=split))
    state.exported_tasks += 1


def _image(task, state: _State) -> ImageEntry | None:
    try:
        source = image_of(task.data, state.config.target.image_key)
    except TaskDataError as exc:
        state.image_failures.append({"task_id": task.id, "error": str(exc)})
        return None
    entry = state.images.collect(source)
    if not entry.ok:
        state.image_failures.append({"task_id": task.id, "error": entry.error})
        return None
    return entry


def _check_sizes(task_id: int, regions, image: ImageEntry, state: _State) -> None:
    """Label Studio records the size the browser showed; it should be the upright size we computed."""
    for r in regions:
        if r.original_width and r.original_height and (r.original_width, r.original_height) != (image.width,
                                                                                              image.height):
            state.warnings.append(
                f"task {task_id}: Label Studio saw the image as {r.original_width}x{r.original_height}, "
                f"the upright file is {image.width}x{image.height}; boxes are relative and were kept")
            return


def _ask_rationales(state: _State, settings: Settings, config: LabelingConfig, options: ExportOptions,
                    client: RationaleClient | None) -> None:
    needing = [s for s in state.samples if s.needs_rationale]
    if not needing:
        return
    client = client or RationaleClient(settings, config.target, project_id=options.project_id,
                                       template=options.rationale_prompt)
    started = time.monotonic()
    try:
        version = client.live_version(options.rationale_timeout_s)
    except FleetError as exc:
        state.warnings.append(f"{len(needing)} corrected sample(s) stay answer-only: {exc}")
        return
    request = client.submit(needing, version)
    found = client.collect(request, max(0.0, options.rationale_timeout_s - (time.monotonic() - started)))
    for sample in needing:
        text = found.get(sample.id)
        if text:
            sample.reasoning, sample.reasoning_source = text, "rationale"


def _reasoning_counts(samples: list[Sample]) -> dict[str, int]:
    out = {"model": 0, "rationale": 0, "none": 0}
    for s in samples:
        out[s.reasoning_source] = out.get(s.reasoning_source, 0) + 1
    return out


def _report(options: ExportOptions, selection: Selection, state: _State, datasets: dict) -> dict:
    return {
        "project": options.project_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {"formats": list(options.formats), "only_from_predictions": options.only_from_predictions,
                    "model_versions": list(options.model_versions), "require_review": options.require_review,
                    "reviews_required": selection.reviews_required, "val_fraction": options.val_fraction,
                    "corrected_reasoning": options.corrected_reasoning,
                    "grpo_images": options.grpo_images, "grpo_single_only": options.grpo_single_only,
                    "accept_tolerance": options.accept_tolerance, "match_iou": options.match_iou},
        "annotations": {"total": len(selection.decisions), "by_status": selection.counts(),
                        "measured": state.measured, "without_prediction": state.without_prediction},
        "tasks": {"accepted": len(selection.chosen), "exported": state.exported_tasks,
                  "image_failures": state.image_failures},
        "samples": {"total": len(state.samples), "reasoning": _reasoning_counts(state.samples),
                    "multi_instance": sum(len(s.boxes) > 1 for s in state.samples)},
        "datasets": datasets,
        "corrections": state.tally.as_dict(),
        "warnings": state.warnings,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
