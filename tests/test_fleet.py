"""The fleet registry and what planners do with it: the version policy, a rolling upgrade with real
worker processes, jobs of a version nobody serves any more, and commands that wait for workers
noticing when they die or never come. Real Redis, real processes, the scripted engine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from egm import processes
from egm.backend.app import create_app
from egm.fleet import Fleet, NoLiveWorker, PromptMismatch, VersionNotServed, WorkerRecord, WorkerState
from egm.identity import prompt_setup
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from tests.bulk_support import write_images
from tests.fault_stack import wait_until
from tests.stack import BOXES_CONFIG, SAMPLES, batch_job, sample_images, spawn_worker, wait_ready

# the reasoning names the label: a box carries only the reasoning about its own label
OLD = ("The old model looked at the {label} here.\n</think>\n\n```json\n"
       "[{{\"bbox_2d\": [10, 10, 200, 200], \"label\": \"{label}\"}}]\n```")
NEW = ("The new model looked at the {label} there.\n</think>\n\n```json\n"
       "[{{\"bbox_2d\": [300, 300, 600, 600], \"label\": \"{label}\"}}]\n```")


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    from egm.config.settings import reload_settings

    return reload_settings()


def _ready(fleet: Fleet, name: str, version: str, settings) -> WorkerRecord:
    record = WorkerRecord(worker=name, state=WorkerState.ready, engine="scripted", model_version=version,
                          prompts=prompt_setup(settings))
    fleet.publish(record)
    return record


# --------------------------------------------------------------------------- the policy


def test_which_version_new_work_goes_to(settings):
    queue = QueueClient(settings)
    fleet = Fleet.from_settings(settings, queue.redis)
    with pytest.raises(NoLiveWorker) as none:
        fleet.current_version()
    assert str(none.value).startswith("no worker is serving a model: start one with `egm-assist worker`")

    fleet.publish(WorkerRecord(worker="loading", state=WorkerState.starting, engine="hf", started_at=time.time()))
    fleet.publish(WorkerRecord(worker="broken", state=WorkerState.failed, engine="hf",
                               reason="could not load the model from '/models/x'"))
    with pytest.raises(NoLiveWorker) as waiting:
        fleet.current_version()
    assert "1 worker(s) still loading their model (loading since" in str(waiting.value)
    assert "worker broken failed to start: could not load the model from '/models/x'" in str(waiting.value)

    _ready(fleet, "a1", "EGM-4B-aaaaaaaaaa", settings)
    assert fleet.current_version() == "EGM-4B-aaaaaaaaaa"
    time.sleep(0.01)
    _ready(fleet, "b1", "EGM-4B-bbbbbbbbbb", settings)  # the fine-tuned model's first worker
    assert fleet.current_version() == "EGM-4B-bbbbbbbbbb"  # new work goes to the new model
    _ready(fleet, "a2", "EGM-4B-aaaaaaaaaa", settings)  # an old worker restarted
    assert fleet.current_version() == "EGM-4B-bbbbbbbbbb"  # does not flip it back
    assert set(fleet.view().live_versions()) == {"EGM-4B-aaaaaaaaaa", "EGM-4B-bbbbbbbbbb"}
    # a planner may pin a version a live worker serves, never one nobody serves
    assert fleet.version_for_planning(settings, "EGM-4B-aaaaaaaaaa") == "EGM-4B-aaaaaaaaaa"
    with pytest.raises(VersionNotServed) as pinned:
        fleet.version_for_planning(settings, "EGM-4B-cccccccccc")
    assert "EGM-4B-aaaaaaaaaa, EGM-4B-bbbbbbbbbb" in str(pinned.value)

    # the new model's only worker goes (its record expires): back to the old one, and said so when none is left
    queue.redis.delete(fleet.keys.fleet_worker("b1"))
    assert fleet.current_version() == "EGM-4B-aaaaaaaaaa"
    for name in ("a1", "a2", "loading"):
        fleet.remove(name)
    with pytest.raises(NoLiveWorker) as gone:
        fleet.current_version()
    assert "last seen: EGM-4B-" in str(gone.value) and "s ago" in str(gone.value)
    assert [w.worker for w in fleet.view().workers] == ["broken"]  # kept a few minutes, for its reason


def test_a_planner_with_other_prompts_than_the_workers_is_refused(settings, monkeypatch, tmp_path):
    from egm.config.settings import reload_settings

    fleet = Fleet.from_settings(settings, QueueClient(settings).redis)
    _ready(fleet, "w", "scripted-0123456789", settings)
    monkeypatch.setenv("EGM_PROMPT_MODE", "per_label")
    with pytest.raises(PromptMismatch) as exc:
        fleet.version_for_planning(reload_settings())
    assert "EGM_PROMPT_MODE multi" in str(exc.value) and "EGM_PROMPT_MODE per_label" in str(exc.value)


# --------------------------------------------------------------------------- a rolling upgrade


def test_rolling_upgrade_new_work_to_the_new_model_old_jobs_drained_then_failed_with_both_versions(
        settings, tmp_path):
    queue = QueueClient(settings)
    fleet = Fleet.from_settings(settings, queue.redis)
    runs = RunStore(queue.redis, queue.prefix)
    image = sample_images()[:1]
    procs = {}
    try:
        procs["old-1"] = spawn_worker(settings, tmp_path / "old-1.log", "--name", "old-1", EGM_SCRIPTED_RESPONSE=OLD,
                                      EGM_SCRIPTED_DELAY_S="0.5", EGM_VERSION_WAIT_S="2")
        v_old = wait_ready(settings, 60, procs["old-1"])
        # a bulk run planned for the old model, most of it still queued when the new model comes
        run_id = "upgrade-run"

        def make_job(task_id: int):
            j = batch_job(image, model_version=v_old, run_id=run_id)
            j.tasks[0].task_id = task_id
            return j

        jobs = [make_job(i) for i in range(1, 7)]
        runs.create(run_id, total=7, model_version=v_old, source="test")
        queue.enqueue_many(jobs)
        procs["new-1"] = spawn_worker(settings, tmp_path / "new-1.log", "--name", "new-1", EGM_SCRIPTED_RESPONSE=NEW,
                                      EGM_VERSION_WAIT_S="2")
        view = fleet.wait_for_ready(60, poll_s=0.1, accept=lambda v: len(v.live_versions()) == 2)
        (v_new,) = set(view.live_versions()) - {v_old}

        # new work goes to the new model, named by it
        assert fleet.current_version() == v_new
        with TestClient(create_app(settings)) as client:
            assert client.post("/setup", json={"project": "1.1", "schema": BOXES_CONFIG}).json()["model_version"] == v_new
            body = {"tasks": [{"id": 1, "data": {"image": str(image[0])}}], "label_config": BOXES_CONFIG}
            (pred,) = client.post("/predict", json=body).json()["results"]
        assert pred["model_version"] == v_new
        assert any("new model" in r["value"].get("text", [""])[0] for r in pred["result"] if r["type"] == "textarea")

        # the old model's queued jobs are drained by the old worker, under its own name
        wait_until(lambda: all(queue.result(j.job_id) for j in jobs), 60, "the old jobs drained")
        for job in jobs:
            result = queue.result(job.job_id)
            assert (result.model_version, result.worker) == (v_old, "old-1")
            assert "old model" in result.results[0].reasoning

        # the old worker leaves; a job still planned for its version waits, then fails naming both versions
        processes.stop(procs.pop("old-1"))
        straggler = make_job(7)
        queue.enqueue(straggler)
        result = wait_until(lambda: queue.result(straggler.job_id), 60, "the straggler failed by the sweep")
        (task,) = result.results
        assert task.status == "failed" and task.error_kind == "version" and not task.ls_result
        assert v_old in task.error and v_new in task.error and "EGM_VERSION_WAIT_S" in task.error
        assert result.worker == "new-1" and result.model_version == v_old  # nothing computed under either name
        assert queue.fetch_job(straggler.job_id).get_status() == "canceled"
        progress = runs.progress(run_id)
        assert (progress.done, progress.failed) == (6, 1)
        assert runs.failed(run_id)[0]["kind"] == "version"

        # an old worker started again serves its version's queue, but new work stays with the new model
        procs["old-2"] = spawn_worker(settings, tmp_path / "old-2.log", "--name", "old-2", EGM_SCRIPTED_RESPONSE=OLD)
        fleet.wait_for_ready(60, poll_s=0.1, accept=lambda v: len(v.live_versions()) == 2)
        assert fleet.current_version() == v_new
        # status lists both versions and which one is current
        out = subprocess.run([sys.executable, "-m", "egm.cli", "status"], capture_output=True, text=True, timeout=60,
                             env={**os.environ})
        assert f"{v_new}" in out.stdout and "current, 1 worker(s) ready" in out.stdout
        assert "draining, 1 worker(s) ready" in out.stdout and "old-2" in out.stdout
    finally:
        for proc in procs.values():
            processes.stop(proc)


# --------------------------------------------------------------------------- commands that wait for workers


def _cli(*argv: str, timeout_s: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egm.cli", *argv], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **env})


def test_prelabel_with_a_local_worker_that_cannot_load_its_model_stops_with_the_workers_reason(settings, tmp_path):
    write_images(tmp_path / "imgs", 3)
    # waits that would hold it for ten minutes: only noticing the worker's death ends it early
    out = _cli("prelabel", "--folder", str(tmp_path / "imgs"), "--labels", "cat", "--local-workers", "1",
               "--out", str(tmp_path / "out"), "--quiet", EGM_ENGINE="hf", MODEL_DIR="/nonexistent",
               EGM_WORKER_WAIT_S="600", EGM_WORKER_START_TIMEOUT_S="600")
    assert out.returncode == 1, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert "exited" in line and "MODEL_DIR /nonexistent does not exist" in line


def test_demo_with_a_missing_model_stops_with_the_workers_reason(settings, tmp_path):
    out = _cli("demo", "--out", str(tmp_path / "demo"), MODEL_DIR="/nonexistent", EGM_ENGINE="hf",
               EGM_WORKER_WAIT_S="600", EGM_WORKER_START_TIMEOUT_S="600")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "MODEL_DIR /nonexistent does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_prelabel_without_any_worker_says_how_long_it_saw_none(settings, tmp_path):
    write_images(tmp_path / "imgs", 2)
    fleet = Fleet.from_settings(settings, QueueClient(settings).redis)
    _ready(fleet, "gone", "EGM-4B-aaaaaaaaaa", settings)
    fleet.remove("gone")  # served once, then left
    out = _cli("prelabel", "--folder", str(tmp_path / "imgs"), "--labels", "cat", "--quiet",
               EGM_WORKER_WAIT_S="2")
    assert out.returncode == 1
    assert "saw no live worker in 2 s" in out.stderr and "last seen: EGM-4B-aaaaaaaaaa" in out.stderr
    assert not list(QueueClient(settings).redis.scan_iter("rq:job:*"))  # nothing planned for nobody


def test_prelabel_pinned_to_a_version_nobody_serves_is_refused(settings, tmp_path):
    write_images(tmp_path / "imgs", 2)
    worker = spawn_worker(settings, tmp_path / "w.log")
    try:
        live = wait_ready(settings, 60, worker)
        out = _cli("prelabel", "--folder", str(tmp_path / "imgs"), "--labels", "cat", "--quiet",
                   "--model-version", "EGM-4B-0000000000")
    finally:
        processes.stop(worker)
    assert out.returncode == 1
    assert "no live worker serves model_version EGM-4B-0000000000; live workers serve " + live in out.stderr


def test_a_run_whose_workers_all_leave_ends_with_a_message_instead_of_waiting_forever(settings, tmp_path):
    write_images(tmp_path / "imgs", 40)
    worker = spawn_worker(settings, tmp_path / "w.log", EGM_SCRIPTED_DELAY_S="1",
                          EGM_LOCAL_FILES_ROOT=str(tmp_path))
    cli = None
    try:
        wait_ready(settings, 60, worker)
        cli = processes.spawn(["prelabel", "--folder", str(tmp_path / "imgs"), "--labels", "cat", "--quiet",
                               "--root", str(tmp_path), "--out", str(tmp_path / "out")],
                              {"EGM_WORKER_WAIT_S": "3", "EGM_BULK_BATCH_SIZE": "4"}, tmp_path / "cli.log")
        runs = RunStore(QueueClient(settings).redis, settings.queue_prefix)
        wait_until(lambda: any((p := runs.progress(r)) and p.done for r in runs.runs()), 60, "the run under way")
        processes.stop(worker)
        assert cli.wait(120) == 1
    finally:
        processes.stop(worker)
        processes.stop(cli)
    text = (tmp_path / "cli.log").read_text()
    assert "error: no live worker for" in text and "resumes with the same command" in text
