"""Bulk runs over folders and manifests with a real Redis and real workers (no Label Studio needed)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from egm.bulk.rq_jobs import cancel_run
from egm.bulk.outputs import COCO_FILE, LS_IMPORT_FILE
from egm.bulk.progress import ProgressPrinter, format_duration, render
from egm.backoff import backoff_s
from egm.bulk.retries import MAX_BACKOFF_S, RetryScheduler
from egm.bulk.runner import BulkRun, local_spec, local_target
from egm.bulk.sources import manifest_tasks
from egm.bulk.spec import batch_job_id
from egm.contract import Priority
from egm.geometry import Box, grid_to_pixels
from egm.queue import QueueClient
from egm.bulk.run_store import RunProgress, RunStore
from tests.bulk_support import CORRUPT_JPEG, run_cli, write_images
from tests.stack import SAMPLES, batch_job, version_of
from egm.worker.batch_worker import run_worker
from egm.worker.engines.scripted import ScriptedEngine


@pytest.fixture()
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture()
def settings(egm_env, monkeypatch, data):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(data.parent))  # workers read everything under tmp_path
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    monkeypatch.setenv("EGM_BULK_BATCH_SIZE", "4")
    monkeypatch.setenv("EGM_ENGINE", "scripted")
    monkeypatch.setenv("EGM_TASK_RETRY_BACKOFF_S", "0.05")
    from egm.config.settings import reload_settings

    return reload_settings()


def make_run(settings, source: Path, out: Path, kind: str = "folder") -> BulkRun:
    spec = local_spec(settings, source=source, source_kind=kind, files_root=Path(settings.local_files_root),
                      out_dir=out, target=local_target(["circle", "square"]),
                      model_version=version_of(settings=settings))
    return BulkRun(settings, spec, poll_s=0.02)


def bulk_depth(queue) -> int:
    return queue.queue(Priority.bulk, version_of()).count


def work(settings, engine: ScriptedEngine, **kw) -> None:
    run_worker(settings, engine=engine, burst=True, **kw)


def test_folder_run_writes_label_studio_import_and_coco_in_upright_pixels(settings, data, tmp_path):
    for p in SAMPLES.glob("*.jpg"):
        shutil.copy(p, data / p.name)
    run = make_run(settings, data, tmp_path / "out")
    plan = run.start()
    assert plan.total == 4 and plan.enqueued_tasks == 4 and len(plan.enqueued_jobs) == 1
    work(settings, ScriptedEngine())
    outcome = run.finish(run.follow(timeout_s=30))
    assert outcome.complete and outcome.progress.state == "done" and outcome.failed == []

    tasks = json.loads((tmp_path / "out" / LS_IMPORT_FILE).read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(f"data/{p.name}" for p in SAMPLES.glob("*.jpg"))
    for t in tasks:
        (pred,) = t["predictions"]
        assert pred["model_version"] == version_of(settings=settings) == run.spec.model_version
        rect = next(r for r in pred["result"] if r["type"] == "rectanglelabels")
        assert rect["from_name"] == "label" and rect["value"]["rectanglelabels"] == ["circle"]

    coco = json.loads((tmp_path / "out" / COCO_FILE).read_text())
    images = {im["file_name"]: im for im in coco["images"]}
    assert (images["data/rotated_exif6.jpg"]["width"], images["data/rotated_exif6.jpg"]["height"]) == (480, 640)
    results = {r.ref: r for r in run.collector.log.read().values()}
    for ann in coco["annotations"]:
        image = next(im for im in coco["images"] if im["id"] == ann["image_id"])
        expected = grid_to_pixels(Box.from_list(results[image["file_name"]].boxes[0].grid),
                                  image["width"], image["height"])
        assert ann["bbox"] == pytest.approx([expected.x1, expected.y1, expected.width, expected.height], abs=0.01)
        assert ann["bbox"][0] + ann["bbox"][2] <= image["width"] + 0.01
        assert ann["bbox"][1] + ann["bbox"][3] <= image["height"] + 0.01


def test_resume_never_double_enqueues_and_rerun_computes_nothing(settings, data, tmp_path):
    write_images(data, 40)
    queue = QueueClient(settings)
    run = make_run(settings, data, tmp_path / "out")
    first = run.start()
    assert first.enqueued_tasks == 40 and len(first.enqueued_jobs) == 10
    # an interrupted CLI resumed before any worker ran: everything is in flight, nothing new
    again = make_run(settings, data, tmp_path / "out").start()
    assert again.enqueued_tasks == 0 and again.in_flight == 40
    assert bulk_depth(queue) == 10
    engine = ScriptedEngine()
    work(settings, engine)
    outcome = run.finish(run.follow(timeout_s=30))
    assert outcome.complete and outcome.progress.done == 40 and engine.requests_seen == 40
    # same command again: nothing to do, nothing computed
    rerun = make_run(settings, data, tmp_path / "out")
    plan = rerun.start()
    assert plan.enqueued_tasks == 0 and plan.done == 40
    assert rerun.finish(rerun.follow(timeout_s=30)).complete
    # the same images in another folder (another run): answered from the cache, nothing computed
    shutil.copytree(data, tmp_path / "copy")
    fresh = make_run(settings, tmp_path / "copy", tmp_path / "out2")
    assert fresh.start().enqueued_tasks == 40
    work(settings, engine)
    outcome = fresh.finish(fresh.follow(timeout_s=30))
    assert engine.requests_seen == 40 and outcome.progress.cached == 40
    assert len(json.loads((tmp_path / "out2" / LS_IMPORT_FILE).read_text())) == 40


def test_job_ids_are_deterministic():
    assert batch_job_id("local-x-1", ["a", "b"]) == batch_job_id("local-x-1", ["a", "b"])
    assert batch_job_id("local-x-1", ["a", "b"]) != batch_job_id("local-x-1", ["a", "c"])
    assert batch_job_id("local-x-1", ["a"]) != batch_job_id("local-x-2", ["a"])


def test_poisoned_image_is_kept_in_the_failed_list_and_retried_with_one_command(settings, data, tmp_path):
    write_images(data, 7)
    (data / "poison.jpg").write_bytes(CORRUPT_JPEG)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    work(settings, ScriptedEngine())
    outcome = run.finish(run.follow(timeout_s=30))
    assert outcome.progress.done == 7 and outcome.progress.failed == 1
    (failed,) = outcome.failed
    assert failed["ref"] == "data/poison.jpg" and failed["kind"] == "image:decode" and failed["error"]
    assert len(json.loads((tmp_path / "out" / LS_IMPORT_FILE).read_text())) == 7
    # a plain re-run leaves the failure alone; `retry` takes it again
    assert make_run(settings, data, tmp_path / "out").start().failed_kept == 1
    shutil.copy(data / "img0001.png", data / "poison.jpg")  # the file gets fixed
    code, summary = run_cli("retry", run.run_id, "--json", "--quiet", "--timeout", "30", "--local-workers", "1")
    assert code == 0, summary
    assert summary["failed"] == [] and summary["progress"]["done"] == 8
    assert len(json.loads((tmp_path / "out" / LS_IMPORT_FILE).read_text())) == 8


def test_transient_failures_are_retried_with_backoff_then_fail_with_their_reason(settings, data, tmp_path, monkeypatch):
    monkeypatch.setenv("EGM_TASK_RETRIES", "2")
    from egm.config.settings import reload_settings

    settings = reload_settings()
    write_images(data, 2)
    manifest = data / "list.txt"
    manifest.write_text("img0000.png\nimg0001.png\nlater.png\nnever.png\n")
    run = make_run(settings, manifest, tmp_path / "out", kind="manifest")
    run.start()
    engine = ScriptedEngine()
    work(settings, engine)
    p = RunStore(run.queue.redis, run.queue.prefix).progress(run.run_id)
    assert (p.done, p.retrying, p.failed) == (2, 2, 0)  # a missing file may appear: not failed yet
    assert set(RetryScheduler(run.queue).pending(run.run_id)) == {"data/later.png", "data/never.png"}
    shutil.copy(data / "img0000.png", data / "later.png")
    for _ in range(3):  # each round: wait out the backoff, promote, work
        time.sleep(backoff_s(3, settings.task_retry_backoff_s, MAX_BACKOFF_S))
        RetryScheduler(run.queue).promote_due()
        work(settings, engine)
    outcome = run.finish(run.follow(timeout_s=30))
    assert outcome.complete and outcome.progress.done == 3
    (failed,) = outcome.failed
    assert failed["ref"] == "data/never.png" and failed["kind"] == "image:fetch" and "not found" in failed["error"]
    assert run.queue.redis.hget(run.runs.key(run.run_id, "attempts"), "data/never.png") == b"3"


def test_cancel_drops_queued_batches_and_workers_skip_the_rest(settings, data, tmp_path):
    write_images(data, 12)
    queue = QueueClient(settings)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    assert bulk_depth(queue) == 3
    # a batch already taken by a worker when the run is cancelled is skipped by that worker
    runs = RunStore(queue.redis, queue.prefix)
    runs.set_state(run.run_id, "cancelled")
    engine = ScriptedEngine()
    work(settings, engine, max_jobs=1)
    assert engine.calls == 0 and bulk_depth(queue) == 2
    report = cancel_run(queue, run.run_id)
    assert report["jobs_cancelled"] == 2 and bulk_depth(queue) == 0
    assert runs.progress(run.run_id).state == "cancelled" and runs.progress(run.run_id).done == 0
    assert run.follow(timeout_s=5).state == "cancelled"
    # resuming picks up everything that was cancelled
    resumed = make_run(settings, data, tmp_path / "out")
    assert resumed.start().enqueued_tasks == 12
    work(settings, engine)
    assert resumed.finish(resumed.follow(timeout_s=30)).progress.done == 12


def test_cancel_command(settings, data, tmp_path):
    write_images(data, 8)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    code, text = run_cli("cancel", run.run_id)
    assert code == 0 and "2 queued batches dropped" in text
    assert run_cli("cancel", "no-such-run")[0] == 2


def test_interactive_request_completes_while_a_bulk_run_is_queued(settings, data, tmp_path):
    write_images(data, 40)
    queue = QueueClient(settings)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    interactive = batch_job([data / "img0000.png"], priority=Priority.interactive)
    queue.enqueue(interactive)  # enqueued after the whole bulk run ...
    work(settings, ScriptedEngine(), max_jobs=1)
    assert queue.result(interactive.job_id).results[0].status == "ok"  # ... served first
    assert bulk_depth(queue) == 10


def test_status_reads_a_running_run_from_another_process_view(settings, data, tmp_path):
    write_images(data, 6)
    (data / "bad.jpg").write_bytes(CORRUPT_JPEG)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    work(settings, ScriptedEngine(), max_jobs=1)  # half the run
    code, status = run_cli("status", run.run_id, "--json")
    assert code == 0 and status["progress"]["total"] == 7 and status["progress"]["resolved"] == 4
    assert status["queues"][f"bulk@{version_of()}"]["queued"] == 1
    work(settings, ScriptedEngine())
    code, status = run_cli("status", run.run_id, "--json")
    assert status["progress"]["done"] == 6 and status["failed_total"] == 1
    assert status["failed"][0]["ref"] == "data/bad.jpg"
    code, listing = run_cli("status", "--json")
    assert [r["run_id"] for r in listing["runs"]] == [run.run_id]
    code, text = run_cli("status", run.run_id)
    assert "bad.jpg" in text and f"egm-assist retry {run.run_id}" in text


def test_prelabel_command_with_local_workers(settings, data, tmp_path):
    write_images(data, 10)
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "id": f"k{i}"}) + "\n"
                                for i, p in enumerate(sorted(data.glob("*.png")))))
    out = tmp_path / "out"
    code, summary = run_cli("prelabel", "--manifest", str(manifest), "--root", str(tmp_path), "--labels", "cat,dog",
                            "--out", str(out), "--local-workers", "2", "--json", "--quiet", "--timeout", "60",
                            "--image-url-prefix", "/data/local-files/?d=imgs/")
    assert code == 0, summary
    assert summary["progress"]["done"] == 10 and summary["complete"]
    tasks = json.loads((out / LS_IMPORT_FILE).read_text())
    assert sorted(t["data"]["egm_ref"] for t in tasks) == [f"k{i}" for i in range(10)]
    assert all(t["data"]["image"].startswith("/data/local-files/?d=imgs/data/img") for t in tasks)
    assert {t["predictions"][0]["result"][0]["value"]["rectanglelabels"][0] for t in tasks} == {"cat"}


def test_prelabel_refuses_bad_input(settings, tmp_path):
    assert run_cli("prelabel", "--folder", str(tmp_path / "nope"), "--labels", "a")[0] == 2
    assert run_cli("prelabel", "--folder", str(tmp_path), "--quiet")[0] == 2  # no labels


def test_manifest_formats(tmp_path):
    root = tmp_path
    (root / "a.png").write_bytes(b"x")
    (root / "sub").mkdir()
    (root / "sub" / "b.png").write_bytes(b"x")
    (root / "m.txt").write_text("# comment\na.png\nsub/b.png\na.png\nhttps://example.com/c.jpg\n")
    assert [(t.ref, t.image) for t in manifest_tasks(root / "m.txt", root)] == [
        ("a.png", "a.png"), ("sub/b.png", "sub/b.png"), ("https://example.com/c.jpg", "https://example.com/c.jpg")]
    (root / "m.jsonl").write_text('{"image": "a.png", "id": 7}\n{"url": "/data/upload/1/x.jpg"}\n'
                                  '{"nothing": 1}\nnot json\n')
    tasks = list(manifest_tasks(root / "m.jsonl", root))
    assert [(t.ref, t.image) for t in tasks[:2]] == [("7", "a.png"), ("/data/upload/1/x.jpg", "/data/upload/1/x.jpg")]
    assert tasks[2].problem and "no image" in tasks[2].problem and tasks[3].problem
    (root / "m.csv").write_text("path,label\nsub/b.png,x\n")
    assert [t.image for t in manifest_tasks(root / "m.csv", root)] == ["sub/b.png"]
    (root / "m.json").write_text(json.dumps([{"data": {"image": "a.png"}}, "sub/b.png"]))
    assert [t.image for t in manifest_tasks(root / "m.json", root)] == ["a.png", "sub/b.png"]
    outside = tmp_path.parent / "elsewhere.png"
    (root / "o.txt").write_text(str(outside) + "\n")
    (task,) = manifest_tasks(root / "o.txt", root)
    assert task.problem and "outside the files root" in task.problem


def test_progress_line():
    p = RunProgress(run_id="r", total=200, done=90, failed=5, cached=10, skipped=5, retrying=2, state="running",
                    started_at=100.0, resumed_at=100.0, updated_at=110.0)
    line = render(p)
    assert "100/200" in line and "50.0%" in line and "10.0 tasks/s" in line and "ETA 00:10" in line
    assert "failed 5" in line and "retrying 2" in line and "cached 10" in line
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "--:--"

    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    sink = Sink()
    printer = ProgressPrinter(sink)
    printer.update(p)
    printer.message("hello")
    printer.close(p)
    assert sink.text.startswith("\r[") and "\nhello\n" in sink.text and sink.text.endswith("\n")


def test_which_failures_are_transient():
    from egm.bulk.retries import is_transient
    from egm.contract import ErrorKind, TaskResult

    def failed(kind, error="x"):
        return TaskResult(task_id=1, status="failed", error_kind=kind, error=error)

    assert is_transient(failed("image:fetch")) and is_transient(failed("engine"))
    assert is_transient(failed(ErrorKind.ls_unavailable, "prediction not written to Label Studio: Label Studio unavailable"))
    assert not is_transient(failed(ErrorKind.ls_refused, "Label Studio refused the prediction: task not found"))
    assert not any(is_transient(failed(k)) for k in ("image:decode", "image:blocked", "image:too_large", "parse"))
    assert not is_transient(TaskResult(task_id=1, status="ok"))
    assert [backoff_s(n, 2.0, MAX_BACKOFF_S) for n in (1, 3, 30)] == [2.0, 8.0, 300.0]


def test_a_changed_folder_is_planned_as_it_is_now(settings, data, tmp_path):
    write_images(data, 8)
    run = make_run(settings, data, tmp_path / "out")
    run.start()
    work(settings, ScriptedEngine())
    assert run.finish(run.follow(timeout_s=30)).progress.done == 8
    (data / "img0000.png").unlink()
    (data / "img0001.png").unlink()
    write_images(tmp_path / "more", 1, seed=9)[0].rename(data / "new.png")
    again = make_run(settings, data, tmp_path / "out")
    plan = again.start()
    assert (plan.total, plan.done, plan.enqueued_tasks) == (7, 6, 1)
    work(settings, ScriptedEngine())
    outcome = again.finish(again.follow(timeout_s=30))
    assert outcome.complete and (outcome.progress.total, outcome.progress.done) == (7, 7)
    tasks = json.loads((tmp_path / "out" / LS_IMPORT_FILE).read_text())
    assert sorted(t["data"]["egm_ref"] for t in tasks) == sorted(
        [f"data/img{i:04d}.png" for i in range(2, 8)] + ["data/new.png"])


def test_a_run_nobody_follows_reads_done_once_its_last_batch_is_recorded(settings, data, tmp_path):
    """`prelabel --no-wait`: the worker that records the last batch completes the run, not only the CLI."""
    write_images(data, 6)
    run = make_run(settings, data, tmp_path / "out")
    plan = run.start()
    runs = RunStore(run.queue.redis, run.queue.prefix)
    assert plan.enqueued_tasks == 6 and runs.progress(run.run_id).state == "running"
    work(settings, ScriptedEngine())
    progress = runs.progress(run.run_id)
    assert (progress.state, progress.resolved, progress.remaining) == ("done", 6, 0)
    # completing is one caller's act: a second check changes nothing
    assert runs.complete_if_done(run.run_id) is False


def test_a_run_is_not_done_before_it_is_planned(settings, data):
    """Batches can finish while the planner still reads the source: no task left so far is not the end."""
    queue = QueueClient(settings)
    runs = RunStore(queue.redis, queue.prefix)
    runs.create("r-unplanned", total=0, model_version="v", source="test")
    runs.mark("r-unplanned", {"a": "ok"})
    runs.set_total("r-unplanned", 1)
    assert runs.complete_if_done("r-unplanned") is False and runs.progress("r-unplanned").state == "running"
    runs.set_planned("r-unplanned")
    assert runs.complete_if_done("r-unplanned") is True and runs.progress("r-unplanned").state == "done"
