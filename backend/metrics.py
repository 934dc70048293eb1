"""``/metrics`` in Prometheus text format.

Fleet-wide figures come from Redis (queue depths, worker count, counters and
histograms that workers and the webhook write through :mod:`egm.stats`, bulk-run
progress), so one scrape of the backend describes every worker.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from egm.config.settings import Settings
from egm.fleet import Fleet
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from egm.stats import StatsStore, parse_field

HISTOGRAMS = {"egm_batch_size", "egm_gpu_seconds", "egm_end_to_end_seconds"}
#: current figures that go down as well as up (an updated or deleted annotation replaces
#: what it contributed, egm/export/live.py): rendered as gauges under their stored name.
GAUGES = {"egm_corrections_total", "egm_correction_iou_sum", "egm_correction_annotations_total"}
DESCRIPTIONS = {
    "egm_jobs_total": "Batch jobs finished by workers.",
    "egm_tasks_total": "Tasks finished by workers, by status.",
    "egm_parse_failures_total": "Tasks whose model output had no parseable box.",
    "egm_cache_hits_total": "Queries answered from the result cache.",
    "egm_engine_queries_total": "Queries sent to the inference engine.",
    "egm_batch_size": "Tasks per batch job.",
    "egm_gpu_seconds": "Engine time per batch job.",
    "egm_end_to_end_seconds": "Time from enqueue to result, per batch job.",
    "egm_corrections_total": "Boxes of live annotations started from a prediction, by what the annotator did "
                             "(accepted, moved, relabeled, deleted, added).",
    "egm_correction_iou_sum": "Sum of IoU between predicted and final box over accepted, moved and relabeled boxes.",
    "egm_correction_annotations_total": "Live annotations started from a prediction whose corrections are measured.",
    "egm_annotation_events_total": "Annotation webhook events received.",
}


class _Collector:
    def __init__(self, settings: Settings, queue: QueueClient) -> None:
        self.queue = queue
        self.stats = StatsStore(queue.redis, settings.queue_prefix)
        self.runs = RunStore(queue.redis, settings.queue_prefix)
        self.fleet = Fleet.from_settings(settings, queue.redis)

    def collect(self):
        depth = GaugeMetricFamily("egm_queue_depth", "Jobs per queue (priority and model_version) and state.",
                                  labels=["queue", "model_version", "state"])
        for d in self.queue.depths().values():
            for state in ("queued", "started", "failed"):
                depth.add_metric([d["priority"], d["model_version"], state], d[state])
        yield depth
        live = self.fleet.view().live_versions()
        workers = GaugeMetricFamily("egm_workers", "Live workers ready to serve (fleet registry).")
        workers.add_metric([], sum(len(w) for w in live.values()))
        yield workers
        per_version = GaugeMetricFamily("egm_version_workers", "Live ready workers per model_version.",
                                        labels=["model_version"])
        for version, ready in sorted(live.items()):
            per_version.add_metric([version], len(ready))
        yield per_version
        yield from self._from_stats()
        yield from self._runs()

    def _from_stats(self):
        counters: dict[str, list] = defaultdict(list)
        hists: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: {"buckets": {}, "sum": 0.0}))
        for raw, value in self.stats.snapshot().items():
            name, labels = parse_field(raw)
            base = next((h for h in HISTOGRAMS if name.startswith(h + "_")), None)
            if base is None:
                counters[name].append((labels, value))
                continue
            le = labels.pop("le", None)
            key = tuple(sorted(labels.items()))
            if name.endswith("_bucket"):
                hists[base][key]["buckets"][le] = value
            elif name.endswith("_sum"):
                hists[base][key]["sum"] = value
        for name, series in sorted(counters.items()):
            label_names = sorted({k for labels, _ in series for k in labels})
            if name in GAUGES:
                family = GaugeMetricFamily(name, DESCRIPTIONS.get(name, name), labels=label_names)
            else:
                family = CounterMetricFamily(name.removesuffix("_total"), DESCRIPTIONS.get(name, name),
                                             labels=label_names)
            for labels, value in series:
                family.add_metric([labels.get(k, "") for k in label_names], value)
            yield family
        for name, by_labels in sorted(hists.items()):
            label_names = sorted({k for key in by_labels for k, _ in key})
            family = HistogramMetricFamily(name, DESCRIPTIONS.get(name, name), labels=label_names)
            for key, h in by_labels.items():
                labels = dict(key)
                buckets = sorted(h["buckets"].items(), key=lambda kv: float("inf") if kv[0] == "+Inf" else float(kv[0]))
                family.add_metric([labels.get(k, "") for k in label_names], buckets=buckets, sum_value=h["sum"])
            yield family

    def _runs(self):
        progress = GaugeMetricFamily("egm_run_tasks", "Tasks of bulk runs by state.", labels=["run", "state"])
        for run_id in self.runs.runs()[-50:]:
            p = self.runs.progress(run_id)
            if p is None:
                continue
            for state in ("total", "enqueued", "done", "failed", "skipped"):
                progress.add_metric([run_id, state], getattr(p, state))
        yield progress


class MetricsCollector:
    def __init__(self, settings: Settings, queue: QueueClient) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(settings, queue))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
