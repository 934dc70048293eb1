"""The queue with a real Redis: jobs go in, workers take them (interactive first), results come back."""

from __future__ import annotations

import json
import zlib

import pytest

from egm.contract import Priority
from egm.queue import QueueClient
from tests.stack import SAMPLES, batch_job, sample_images, version_of
from egm.worker.batch_worker import run_worker
from egm.worker.engines.scripted import ScriptedEngine


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    from egm.config.settings import reload_settings

    return reload_settings()


def test_job_payload_carries_references_not_bytes(settings):
    queue = QueueClient(settings)
    job = batch_job(sample_images())
    rq_job = queue.enqueue(job)
    raw = queue.redis.hget(f"rq:job:{rq_job.id}", "data")  # zlib-compressed JSON
    payload = json.loads(zlib.decompress(raw))
    assert len(raw) < 4000  # four tasks: paths and prompts only, no pixels
    assert payload[2][0]["tasks"][0]["image"].endswith(".jpg")


def test_worker_consumes_and_result_comes_back(settings):
    queue = QueueClient(settings)
    job = batch_job(sample_images())
    queue.enqueue(job)
    engine = ScriptedEngine()
    assert run_worker(settings, engine=engine, burst=True)
    result = queue.result(job.job_id)
    assert result is not None and len(result.results) == len(job.tasks)
    assert engine.calls == 1 and engine.requests_seen == len(job.tasks)  # one engine call for the batch
    for task, r in zip(job.tasks, result.results):
        assert r.task_id == task.task_id and r.status == "ok"
        rects = [i for i in r.ls_result if i["type"] == "rectanglelabels"]
        assert len(rects) == 1 and rects[0]["value"]["rectanglelabels"] == ["circle"]
        assert rects[0]["original_width"] == r.width
        v = rects[0]["value"]
        assert 0 <= v["x"] and v["x"] + v["width"] <= 100 and 0 <= v["y"] and v["y"] + v["height"] <= 100
        # the reasoning sits in the per-region TextArea with the same region id
        texts = [i for i in r.ls_result if i["type"] == "textarea"]
        assert texts[0]["id"] == rects[0]["id"] and "circle" in texts[0]["value"]["text"][0]
    # the EXIF-rotated sample is reported upright
    rotated = next(r for t, r in zip(job.tasks, result.results) if "exif6" in t.image)
    assert (rotated.width, rotated.height) == (480, 640)


def test_interactive_jobs_overtake_queued_bulk_jobs(settings):
    queue = QueueClient(settings)
    images = sample_images()
    bulk = [batch_job(images[:1]) for _ in range(5)]
    queue.enqueue_many(bulk)
    interactive = batch_job(images[:1], priority=Priority.interactive)
    queue.enqueue(interactive)  # enqueued last ...
    run_worker(settings, engine=ScriptedEngine(), burst=True)
    finished = sorted((queue.result(j.job_id).finished_at, j.priority) for j in [*bulk, interactive])
    assert finished[0][1] == Priority.interactive  # ... served first


def test_broken_image_fails_only_its_task(settings, tmp_path):
    queue = QueueClient(settings)
    bad = SAMPLES / "not-there.jpg"
    job = batch_job([sample_images()[0], bad, sample_images()[1]])
    queue.enqueue(job)
    run_worker(settings, engine=ScriptedEngine(), burst=True)
    statuses = [r.status for r in queue.result(job.job_id).results]
    assert statuses == ["ok", "failed", "ok"]
    failed = queue.result(job.job_id).results[1]
    assert failed.error_kind.startswith("image") and "not-there.jpg" in failed.error


def test_engine_error_for_one_request_fails_only_that_task(settings):
    queue = QueueClient(settings)
    engine = ScriptedEngine(fail_on="POISON")
    job = batch_job(sample_images()[:2], model_version=version_of(engine))
    job.tasks[1].queries[0].text = "Locate POISON, output its bbox coordinates using JSON format"
    queue.enqueue(job)
    run_worker(settings, engine=engine, burst=True)
    r = queue.result(job.job_id).results
    assert [x.status for x in r] == ["ok", "failed"] and r[1].error_kind == "engine"


def test_unparseable_output_is_a_clear_task_failure(settings):
    queue = QueueClient(settings)
    engine = ScriptedEngine(template="I refuse to answer.")
    job = batch_job(sample_images()[:1], model_version=version_of(engine))
    queue.enqueue(job)
    run_worker(settings, engine=engine, burst=True)
    r = queue.result(job.job_id).results[0]
    assert r.status == "failed" and r.error_kind == "parse" and r.completions == ["I refuse to answer."]


def test_same_image_and_prompt_is_never_computed_twice(settings):
    queue = QueueClient(settings)
    engine = ScriptedEngine()
    first = batch_job(sample_images())
    queue.enqueue(first)
    run_worker(settings, engine=engine, burst=True)
    second = batch_job(sample_images())  # same images and prompt, a new job
    queue.enqueue(second)
    run_worker(settings, engine=engine, burst=True)
    assert engine.requests_seen == len(first.tasks)
    again = queue.result(second.job_id).results
    assert all(r.cached for r in again)
    assert [r.boxes[0].grid for r in again] == [r.boxes[0].grid for r in queue.result(first.job_id).results]


def test_delivery_handshake_gives_the_result_to_exactly_one_side(settings):
    queue = QueueClient(settings)
    job = batch_job(sample_images()[:1], priority=Priority.interactive)
    queue.enqueue(job)
    # /predict gives up before the worker ran: the worker must deliver, the backend must not
    assert queue.hand_off(job.job_id) is None
    run_worker(settings, engine=ScriptedEngine(), burst=True)
    assert queue.redis.get(queue.keys.deliver(job.job_id)) == b"worker"
    assert queue.claim_for_response(job.job_id) is None
    # a job that finished in time is claimed by the backend, and the worker stays out
    job2 = batch_job(sample_images()[:1], priority=Priority.interactive)
    queue.enqueue(job2)
    run_worker(settings, engine=ScriptedEngine(), burst=True)
    assert queue.claim_for_response(job2.job_id) is not None
    assert queue.worker_must_deliver(job2.job_id) is False


def test_status_shows_queues_workers_and_throughput(settings):
    import os
    import subprocess
    import sys

    queue = QueueClient(settings)
    queue.enqueue(batch_job(sample_images()))
    queue.enqueue(batch_job(sample_images()[:1]))  # stays queued: the worker below takes one job
    run_worker(settings, engine=ScriptedEngine(), burst=True, max_jobs=1)
    env = {**os.environ, "REDIS_URL": settings.redis_url, "EGM_QUEUE_PREFIX": settings.queue_prefix}
    out = subprocess.run([sys.executable, "-m", "egm.cli", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    version = version_of()
    assert f"bulk@{version}: 1 queued, 0 running" in out.stdout
    # the worker has left: its version is listed with the job that waits for it
    assert version in out.stdout.split("queues:")[0] and "no live worker" in out.stdout and "1 job(s) queued" in out.stdout
    assert f"tasks:   ok {len(sample_images())}, failed 0" in out.stdout
    rate = float(out.stdout.split("throughput ")[1].split()[0])
    assert rate > 0


def test_recent_rate_counts_only_the_window(settings):
    from egm.stats import StatsStore

    stats = StatsStore(QueueClient(settings).redis, settings.queue_prefix)
    now = 1_000_000.0
    stats.count_finished(600, now=now - 5)      # inside the last minute
    stats.count_finished(999, now=now - 3600)   # long ago
    assert 600 / 61 <= stats.recent_rate(60, now=now) <= 600 / 50



def _run_three_jobs(settings) -> tuple[list, object]:
    from egm.worker import rq_entry

    queue = QueueClient(settings)
    images = sample_images()
    batch = [batch_job(images[:2]), batch_job([images[2], SAMPLES / "not-there.jpg"]), batch_job(images[1:3])]
    for job in batch:
        queue.enqueue(job)
    assert run_worker(settings, engine=ScriptedEngine(), burst=True)
    return [queue.result(j.job_id) for j in batch], rq_entry.runtime()


def test_prefetched_images_give_the_same_results_as_loading_in_the_batch(settings, monkeypatch):
    """Jobs after the first get their images from the look-ahead; nothing in the results depends on it
    (a missing image fails its task the same way)."""
    ahead, rt = _run_three_jobs(settings)
    assert rt.prefetcher is not None and (rt.prefetcher.hits, rt.prefetcher.misses) == (2, 1)
    monkeypatch.setenv("EGM_PREFETCH", "false")
    monkeypatch.setenv("EGM_QUEUE_PREFIX", settings.queue_prefix + "-noprefetch")
    from egm.config.settings import reload_settings

    plain, rt = _run_three_jobs(reload_settings())
    assert rt.prefetcher is None

    def comparable(result):
        return [(r.task_id, r.status, r.error_kind, r.width, r.height, [b.grid for b in r.boxes])
                for r in result.results]

    assert [comparable(r) for r in ahead] == [comparable(r) for r in plain]
    assert [r.status for r in ahead[1].results] == ["ok", "failed"]
    assert ahead[1].results[1].error_kind.startswith("image")
