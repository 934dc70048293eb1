"""Interactive jobs during a bulk batch (issue 13, item 7), worker side: real Redis, real RQ worker
(in-process, burst), the tiny random Qwen3-VL's fast path on the CPU.

An interactive job that arrives while a bulk batch is decoding runs in a pause of that batch:
its result is stored before the bulk batch's (ordering, not timing), through RQ like any job
(finished registry, one result per task), and neither answer changes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from egm.contract import Priority
from egm.queue import QueueClient
from egm.worker import rq_entry
from egm.worker.batch_worker import run_worker
from egm.worker.engines.base import DecodingConfig
from egm.worker.engines.hf import HFEngine
from egm.worker.engines.scripted import ScriptedEngine
from tests.fixtures.model import TEST_MAX_PIXELS, TEST_MIN_PIXELS
from tests.stack import SAMPLES, batch_job, sample_images, version_of


@pytest.fixture(scope="module")
def long_engine(tiny_random_model_dir: Path) -> HFEngine:
    """Fast path, 24 tokens always (no EOS), so every batch decodes past a few pauses."""
    engine = HFEngine(str(tiny_random_model_dir), DecodingConfig(max_new_tokens=24), TEST_MAX_PIXELS,
                      TEST_MIN_PIXELS, device="cpu", compile=True, batch_size=8, ignore_eos=True)
    yield engine
    engine.close()


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    monkeypatch.setenv("EGM_CACHE_TTL_S", "0")  # every run computes its answers
    monkeypatch.setenv("EGM_PREEMPT_CHECK_S", "0")
    from egm.config.settings import reload_settings

    return reload_settings()


class ArrivesDuringDecoding:
    """Wraps an engine: during the bulk batch's ``arrive_at``-th pause an interactive job is enqueued
    (as /predict would), then the worker's own hook runs."""

    def __init__(self, engine, queue: QueueClient, interactive_job, arrive_at: int) -> None:
        self.engine, self.queue, self.job, self.arrive_at = engine, queue, interactive_job, arrive_at
        self.pauses = engine.pauses
        self.pause_calls = 0
        self.enqueued = False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests, between_steps=None):
        if between_steps is None:
            return self.engine.generate(requests)

        def pause() -> None:
            self.pause_calls += 1
            if self.pause_calls == self.arrive_at and not self.enqueued:
                self.queue.enqueue(self.job)
                self.enqueued = True
            between_steps()

        return self.engine.generate(requests, between_steps=pause)


def _jobs(settings, engine):
    version = version_of(engine, settings)
    images = sample_images()
    bulk = batch_job(images[:3], model_version=version)
    interactive = batch_job(images[3:4], priority=Priority.interactive, model_version=version)
    return bulk, interactive


def _answers(result) -> list:
    return [(r.task_id, r.status, r.completions) for r in result.results]


def test_interactive_job_arriving_while_bulk_decodes_is_answered_first(settings, long_engine):
    queue = QueueClient(settings)
    bulk, interactive = _jobs(settings, long_engine)
    # pause 1: before the chunk, 2: before the prefill, then inside it, then every 8 decode steps
    layers = long_engine.model.config.text_config.num_hidden_layers
    arrive_at = 2 + (layers - 1) // 6 + 1  # the first pause of the decode loop
    engine = ArrivesDuringDecoding(long_engine, queue, interactive, arrive_at)
    queue.enqueue(bulk)
    assert run_worker(settings, engine=engine, burst=True)
    assert engine.enqueued
    rt = rq_entry.runtime()
    assert rt.preemptor is not None and rt.preemptor.taken == 1
    got_bulk, got_interactive = queue.result(bulk.job_id), queue.result(interactive.job_id)
    assert got_interactive.finished_at < got_bulk.finished_at  # answered inside the bulk batch
    assert [r.task_id for r in got_bulk.results] == [t.task_id for t in bulk.tasks]
    assert [r.task_id for r in got_interactive.results] == [t.task_id for t in interactive.tasks]
    # both went through RQ: finished, nothing left started or queued
    for job, priority in ((bulk, Priority.bulk), (interactive, Priority.interactive)):
        q = queue.queue(priority, bulk.model_version)
        assert Job.fetch(job.job_id, connection=queue.redis, serializer=JSONSerializer).get_status() == "finished"
        assert job.job_id in FinishedJobRegistry(queue=q).get_job_ids()
        assert StartedJobRegistry(queue=q).count == 0 and q.count == 0

    # the same two jobs again, one after the other without any pause: the same answers
    monkey_settings = settings.model_copy(update={"preempt_interactive": False})
    bulk2, interactive2 = _jobs(settings, long_engine)
    queue.enqueue(bulk2)
    queue.enqueue(interactive2)
    assert run_worker(monkey_settings, engine=long_engine, burst=True)
    assert rq_entry.runtime().preemptor is None
    alone_bulk, alone_interactive = queue.result(bulk2.job_id), queue.result(interactive2.job_id)
    assert alone_interactive.finished_at < alone_bulk.finished_at  # interactive first: taken before the bulk job
    assert _answers(got_bulk) == _answers(alone_bulk)
    assert _answers(got_interactive) == _answers(alone_interactive)
    assert all(r.completions for r in got_bulk.results + got_interactive.results)


def test_without_a_waiting_job_the_bulk_batch_only_peeks(settings):
    queue = QueueClient(settings)
    bulk = batch_job(sample_images()[:2])
    queue.enqueue(bulk)
    assert run_worker(settings, engine=ScriptedEngine(delay_s=0.3), burst=True)
    rt = rq_entry.runtime()
    assert rt.preemptor is not None and rt.preemptor.taken == 0
    assert queue.result(bulk.job_id) is not None


def test_interactive_jobs_are_not_paused_for_and_a_bulk_only_worker_does_not_preempt(settings):
    queue = QueueClient(settings)
    images = sample_images()
    first = batch_job(images[:1], priority=Priority.interactive)
    second = batch_job(images[1:2], priority=Priority.interactive)
    engine = ArrivesDuringDecoding(ScriptedEngine(delay_s=0.3), queue, second, arrive_at=1)
    queue.enqueue(first)
    assert run_worker(settings, engine=engine, burst=True)
    assert engine.pause_calls == 0 and rq_entry.runtime().preemptor.taken == 0  # an interactive batch offers no pause
    assert queue.result(first.job_id) is not None

    bulk = batch_job(images[:1])
    queue.enqueue(bulk)
    run_worker(settings, engine=ScriptedEngine(delay_s=0.3), burst=True, priorities=[Priority.bulk])
    assert rq_entry.runtime().preemptor is None


def test_a_failing_interactive_job_fails_through_rq_and_the_bulk_batch_goes_on(settings, monkeypatch):
    """The interactive job's own failure (here: its function raises) is RQ's to retry; the paused
    bulk batch finishes unchanged."""
    monkeypatch.setenv("EGM_JOB_RETRIES", "0")
    from egm.config.settings import reload_settings

    settings = reload_settings()
    queue = QueueClient(settings)
    bulk, interactive = _jobs(settings, ScriptedEngine())
    real = rq_entry.run_batch

    def run_batch(payload):
        if payload["priority"] == "interactive":
            raise RuntimeError("interactive job broke")
        return real(payload)

    monkeypatch.setattr(rq_entry, "run_batch", run_batch)
    engine = ArrivesDuringDecoding(ScriptedEngine(delay_s=0.3), queue, interactive, arrive_at=1)
    queue.enqueue(bulk)
    assert run_worker(settings, engine=engine, burst=True)
    rq_job = Job.fetch(interactive.job_id, connection=queue.redis, serializer=JSONSerializer)
    assert rq_job.get_status() == "failed"
    assert queue.result(bulk.job_id) is not None and all(r.status == "ok" for r in queue.result(bulk.job_id).results)


def test_an_interactive_jobs_images_do_not_wait_behind_a_bulk_prefetch(settings):
    """The prefetcher has a lane per priority: while the next bulk job's images are still loading,
    the interactive job's are loaded (and taken) on their own lane."""
    import threading

    from egm.worker.prefetch import Prefetcher

    queue = QueueClient(settings)
    images = sample_images()
    running, next_bulk = batch_job(images[:1]), batch_job(images[1:3])
    interactive = batch_job(images[3:4], priority=Priority.interactive)
    for job in (next_bulk, interactive):
        queue.enqueue(job)
    release = threading.Event()

    def load(job):
        if job.priority == Priority.bulk:
            assert release.wait(30)  # a slow bulk load: 64 photos from a slow store
        return [f"images of {job.job_id}"]

    prefetcher = Prefetcher(queue, load, "w-test", model_version=running.model_version)
    try:
        assert prefetcher.look_ahead(running.job_id) == interactive.job_id  # interactive first, both started
        assert prefetcher.loading(next_bulk.job_id) is True
        deadline = time.monotonic() + 10
        while prefetcher.loading(interactive.job_id) and time.monotonic() < deadline:
            release.wait(0.01)
        assert prefetcher.loading(interactive.job_id) is False  # ready while the bulk load still runs
        assert prefetcher.loading(next_bulk.job_id) is True
        assert prefetcher.take(interactive) == [f"images of {interactive.job_id}"]
        assert prefetcher.loading(interactive.job_id) is None  # taken: not held any more
    finally:
        release.set()
        prefetcher.close()
    assert prefetcher.take(next_bulk) == [f"images of {next_bulk.job_id}"]


def test_the_hook_looks_at_the_queue_at_most_every_check_period(settings, monkeypatch):
    """A pause costs one LINDEX at most every EGM_PREEMPT_CHECK_S; a job found is popped off the
    queue and handed to the worker's run_inline, once."""
    from egm.worker import preempt

    queue = QueueClient(settings)
    clock = [100.0]
    monkeypatch.setattr(preempt.time, "monotonic", lambda: clock[0])
    ran: list[str] = []
    hook = preempt.Preemptor(queue, version_of(), check_every_s=0.05)
    hook.run_inline = lambda job, q: ran.append(job.id)
    assert hook.hook_for("bulk-1", Priority.interactive) is None  # only bulk batches pause
    pause = hook.hook_for("bulk-1", Priority.bulk)
    pause()  # looks: nothing waiting
    interactive = batch_job(sample_images()[:1], priority=Priority.interactive)
    queue.enqueue(interactive)
    clock[0] += 0.01
    pause()  # within the period: does not look
    assert ran == [] and queue.queue(Priority.interactive, interactive.model_version).count == 1
    clock[0] += 0.05
    pause()
    assert ran == [interactive.job_id] and hook.taken == 1
    assert queue.queue(Priority.interactive, interactive.model_version).count == 0
    hook.stopping = lambda: True  # a worker asked to stop takes nothing more
    queue.enqueue(batch_job(sample_images()[:1], priority=Priority.interactive))
    clock[0] += 1
    pause()
    assert ran == [interactive.job_id]


def test_both_jobs_are_running_and_kept_alive_while_the_interactive_one_runs_in_a_pause(settings, monkeypatch):
    """Inside the pause RQ knows both jobs as started, and the heartbeat covers both: a long
    interactive job cannot make the paused bulk job look abandoned (nor the other way round)."""
    queue = QueueClient(settings)
    bulk, interactive = _jobs(settings, ScriptedEngine())
    seen: dict = {}
    real = rq_entry.run_batch

    def run_batch(payload):
        if payload["priority"] == "interactive":
            worker = rq_entry.runtime().preemptor.run_inline.__self__
            seen["running"] = [j.id for j, _ in worker._running]
            registries = {p: StartedJobRegistry(queue=queue.queue(p, bulk.model_version))
                          for p in (Priority.bulk, Priority.interactive)}
            before = {p: dict(queue.redis.zrange(r.key, 0, -1, withscores=True)) for p, r in registries.items()}
            time.sleep(1.1)
            worker._beat_running()
            after = {p: dict(queue.redis.zrange(r.key, 0, -1, withscores=True)) for p, r in registries.items()}
            seen["started"] = {p.value: r.get_job_ids() for p, r in registries.items()}
            seen["renewed"] = {p.value: all(after[p][k] > v for k, v in before[p].items()) and bool(before[p])
                               for p in registries}
        return real(payload)

    monkeypatch.setattr(rq_entry, "run_batch", run_batch)
    engine = ArrivesDuringDecoding(ScriptedEngine(delay_s=0.3), queue, interactive, arrive_at=1)
    queue.enqueue(bulk)
    assert run_worker(settings, engine=engine, burst=True)
    assert seen["running"] == [bulk.job_id, interactive.job_id]
    assert seen["started"] == {"bulk": [bulk.job_id], "interactive": [interactive.job_id]}
    assert seen["renewed"] == {"bulk": True, "interactive": True}
    assert queue.result(interactive.job_id).finished_at < queue.result(bulk.job_id).finished_at
