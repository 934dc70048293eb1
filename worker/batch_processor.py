"""One batch job, start to finish: images -> cache/engine -> parse -> boxes -> Label Studio items.

Failures stay with their task: a broken image, an engine error for one request
or an unparseable answer fails that task with a reason and never the batch.
Only an engine that fails as a whole raises (the job is then retried by RQ).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from egm.config.settings import Settings
from egm.active_learning import prediction_score, samples_agreement
from egm.confidence import box_scores
from egm.contract import BatchJob, BatchResult, BoxResult, ErrorKind, LabelTarget, Query, TaskJob, TaskResult
from egm.geometry import grid_to_pixels
from egm.labelstudio.results import build_result
from egm.parsing import ParsedCompletion, ParseStatus, parse_completion
from egm.worker.cache import CachedOutput, ResultCache
from egm.worker.engines.base import BetweenSteps, Engine, EngineRequest
from egm.worker.identity import identify
from egm.images import ImageLoadError, LoadedImage, fetch_many

log = logging.getLogger(__name__)


@dataclass
class QueryOutcome:
    query: Query
    text: str | None = None
    scores: list[float | None] = field(default_factory=list)
    error: str | None = None
    cached: bool = False
    #: extra answers for the samples-agreement score (EGM_UNCERTAINTY=samples|both).
    samples: list[str] = field(default_factory=list)
    _parsed: ParsedCompletion | None = field(default=None, repr=False)

    @property
    def parsed(self) -> ParsedCompletion | None:
        """The parsed answer, parsed once (scores and boxes both need it)."""
        if self.text is None:
            return None
        if self._parsed is None or self._parsed.text != self.text:
            self._parsed = parse_completion(self.text)
        return self._parsed


@dataclass
class BatchStats:
    tasks: int = 0
    failed: int = 0
    cached_queries: int = 0
    engine_queries: int = 0
    parse_failures: int = 0
    gpu_seconds: float = 0.0
    #: how long the batch waited for its images (near zero when they were prefetched)
    image_seconds: float = 0.0
    prefetched: bool = False


class BatchProcessor:
    """Holds the resident engine and runs batch jobs through it."""

    def __init__(self, engine: Engine, settings: Settings, cache: ResultCache | None = None,
                 ls_client=None, worker_name: str | None = None, model_version: str | None = None) -> None:
        self.engine = engine
        self.settings = settings
        #: the worker's own identity: it keys the cache and names every result, whatever a job expected.
        self.model_version = model_version or identify(engine, settings).model_version
        self.cache = cache
        self.ls_client = ls_client
        self.worker_name = worker_name
        self.last_stats = BatchStats()

    # -- public -------------------------------------------------------------
    def load_images(self, job: BatchJob) -> list[LoadedImage | ImageLoadError]:
        """The job's images, one entry per task (never raises; also the prefetcher's loader)."""
        return fetch_many([t.image for t in job.tasks], settings=self.settings, ls_client=self.ls_client)

    def process(self, job: BatchJob, images: list[LoadedImage | ImageLoadError] | None = None,
                between_steps: BetweenSteps | None = None) -> BatchResult:
        """Run the job; ``images`` are its images loaded ahead (:mod:`egm.worker.prefetch`), if any;
        ``between_steps``: the engine's pause hook (:mod:`egm.worker.preempt`)."""
        stats = BatchStats(tasks=len(job.tasks), prefetched=images is not None)
        t0 = time.perf_counter()
        if images is None:
            images = self.load_images(job)
        stats.image_seconds = time.perf_counter() - t0

        outcomes = self._run_queries(job, images, stats, between_steps)
        results = [
            self._task_result(task, image, outcomes.get(i, []), job.target, stats)
            for i, (task, image) in enumerate(zip(job.tasks, images))
        ]
        stats.failed = sum(r.status == "failed" for r in results)
        self.last_stats = stats
        return BatchResult(job_id=job.job_id, model_version=self.model_version, worker=self.worker_name,
                           results=results)

    # -- queries: cache first, then one engine call for all misses -------------
    def _samples_per_query(self) -> int:
        """K answers per query when the uncertainty score compares samples, else 1."""
        if self.settings.uncertainty not in ("samples", "both"):
            return 1
        return max(1, self.settings.uncertainty_samples)

    def _run_queries(self, job: BatchJob, images: list, stats: BatchStats,
                     between_steps: BetweenSteps | None = None) -> dict[int, list[QueryOutcome]]:
        k = self._samples_per_query()
        outcomes: dict[int, list[QueryOutcome]] = {}
        pending: list[tuple[int, int, list[str]]] = []  # (task index, query index, cache keys: answer + samples)
        for i, (task, image) in enumerate(zip(job.tasks, images)):
            if isinstance(image, ImageLoadError):
                continue
            outcomes[i] = [QueryOutcome(query=q) for q in task.queries]
            for j, q in enumerate(task.queries):
                keys = ([self.cache.key(image.sha256, q.text, self.model_version)]
                        + [self.cache.key(image.sha256, q.text, f"{self.model_version}#sample{n}") for n in range(1, k)]
                        if self.cache else [""] * k)
                pending.append((i, j, keys))

        flat = [key for _, _, keys in pending for key in keys]
        hits = self.cache.get_many(flat) if self.cache else [None] * len(flat)
        misses = []
        for n, (i, j, keys) in enumerate(pending):
            found = hits[n * k:(n + 1) * k]
            if all(h is not None for h in found):  # a query is cached only with all its samples
                o = outcomes[i][j]
                o.text, o.scores, o.cached = found[0].text, found[0].box_scores, True
                o.samples = [h.text for h in found[1:]]
                stats.cached_queries += 1
            else:
                misses.append((i, j, keys))

        to_store: dict[str, CachedOutput] = {}
        for chunk_start in range(0, len(misses), max(1, self.settings.batch_size)):
            chunk = misses[chunk_start:chunk_start + max(1, self.settings.batch_size)]
            # K copies of each request: the first is the kept answer, the others are compared with it.
            requests = [EngineRequest(image=images[i].image, prompt=outcomes[i][j].query.text,
                                      request_id=f"{job.job_id}:{i}:{j}" + (f":s{n}" if n else ""))
                        for i, j, _ in chunk for n in range(k)]
            t0 = time.perf_counter()
            outputs = (self.engine.generate(requests, between_steps=between_steps)
                       if between_steps is not None and self.engine.pauses else self.engine.generate(requests))
            stats.gpu_seconds += time.perf_counter() - t0
            stats.engine_queries += len(requests)
            for m, (i, j, keys) in enumerate(chunk):
                out, extra = outputs[m * k], outputs[m * k + 1:(m + 1) * k]
                o = outcomes[i][j]
                if out.error:
                    o.error = out.error
                    continue
                o.text = out.text
                o.scores = box_scores(o.parsed, out.tokens, out.logprobs)
                o.samples = _sample_texts(out, extra, k - 1)
                if keys[0]:
                    to_store[keys[0]] = CachedOutput(text=o.text, box_scores=o.scores)
                    if len(o.samples) == k - 1:
                        to_store.update({key: CachedOutput(text=t, box_scores=[])
                                         for key, t in zip(keys[1:], o.samples)})
        if self.cache:
            self.cache.put_many(to_store)
        return outcomes

    # -- one task's result ---------------------------------------------------------
    def _task_result(self, task: TaskJob, image: LoadedImage | ImageLoadError, outcomes: list[QueryOutcome],
                     target: LabelTarget, stats: BatchStats) -> TaskResult:
        base = {"task_id": task.task_id, "ref": task.ref}
        if isinstance(image, ImageLoadError):
            return TaskResult(**base, status="failed", error=str(image), error_kind=ErrorKind.of_image(image.kind))
        if not outcomes:
            return TaskResult(**base, status="failed", error="task has no queries", error_kind=ErrorKind.request,
                              width=image.width, height=image.height)
        errors = [o.error for o in outcomes if o.error]
        if len(errors) == len(outcomes):
            return TaskResult(**base, status="failed", error=f"engine: {errors[0]}", error_kind=ErrorKind.engine,
                              width=image.width, height=image.height)

        boxes: list[BoxResult] = []
        reasonings: list[str] = []
        statuses: list[ParseStatus] = []
        for o in outcomes:
            parsed = o.parsed
            if parsed is None:
                continue
            statuses.append(parsed.status)
            boxes.extend(self._boxes(parsed, o, target, image))
            if parsed.reasoning:
                reasonings.append(parsed.reasoning if len(outcomes) == 1 or not o.query.label
                                  else f"{o.query.label}: {parsed.reasoning}")
        completions = [o.text for o in outcomes if o.text is not None]
        if statuses and all(s == ParseStatus.unparseable for s in statuses):
            stats.parse_failures += 1
            return TaskResult(**base, status="failed", error="model output has no box that could be parsed",
                              error_kind=ErrorKind.parse, parse_status=ParseStatus.unparseable.value,
                              completions=completions, width=image.width, height=image.height)
        reasoning = "\n".join(reasonings)
        worst = _worst_status(statuses)
        return TaskResult(
            **base, status="ok", reasoning=reasoning, boxes=boxes, parse_status=worst.value,
            width=image.width, height=image.height, score=self._score(boxes, outcomes),
            ls_result=build_result(boxes, target, image.width, image.height, reasoning,
                                   referring=any(o.query.expression for o in outcomes)),
            completions=completions, cached=all(o.cached for o in outcomes),
        )

    def _score(self, boxes: list[BoxResult], outcomes: list[QueryOutcome]) -> float | None:
        """The prediction's score (higher = surer); see egm.active_learning for the formula."""
        per_query = [[o.parsed.grid_boxes, *([pb.box for pb in parse_completion(t).boxes] for t in o.samples)]
                     for o in outcomes if o.parsed is not None and o.samples]
        return prediction_score([b.score for b in boxes], samples_agreement(per_query), self.settings.uncertainty)

    def _boxes(self, parsed: ParsedCompletion, outcome: QueryOutcome, target: LabelTarget,
               image: LoadedImage) -> list[BoxResult]:
        out = []
        for k, pb in enumerate(parsed.boxes):
            # A typed prompt's label is decided by the planner (egm.queries.prompt_label) and comes as
            # query.label; never guess one here (not the config's first label: it is wrong more often than not).
            label = outcome.query.label or target.resolve_label(pb.label, fallback=outcome.query.expression)
            if label is None:
                log.info("dropping box with label not in config",
                         extra={"model_label": pb.label, "prompt": outcome.query.expression is not None})
                continue
            score = outcome.scores[k] if k < len(outcome.scores) else None
            out.append(BoxResult(
                label=label, grid=pb.box.to_list(), model_label=pb.label, score=score,
                pixels=grid_to_pixels(pb.box, image.width, image.height).to_list(2),
            ))
        return out


_SEVERITY = [ParseStatus.ok, ParseStatus.no_boxes, ParseStatus.repaired, ParseStatus.unparseable]


def _sample_texts(out, extra_outputs: list, wanted: int) -> list[str]:
    """Up to ``wanted`` extra answers: those to the repeated requests (the K-sample mechanism)."""
    texts = [e.text for e in extra_outputs if not e.error]
    return [t for t in texts if isinstance(t, str)][:wanted]


def _worst_status(statuses: list[ParseStatus]) -> ParseStatus:
    return max(statuses, key=_SEVERITY.index) if statuses else ParseStatus.unparseable
