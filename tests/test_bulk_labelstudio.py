"""Bulk pre-annotation against a real Label Studio: CLI -> Redis -> worker processes -> Label Studio.

Workers are subprocesses running the scripted engine, so SIGKILL is a real kill.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from rq.registry import StartedJobRegistry

from egm import processes
from egm.contract import BatchJob, Priority, Query, TaskJob
from egm.queue import QueueClient
from egm.bulk.run_store import RunStore
from egm.stats import StatsStore
from tests.bulk_support import CORRUPT_JPEG, image_bytes, run_cli
from tests.stack import BOXES_CONFIG, TARGET, spawn_worker, version_of, worker_env

pytestmark = pytest.mark.labelstudio
BATCH = "8"


@pytest.fixture()
def ls_env(label_studio, egm_env, monkeypatch):
    """The CLI (in this process) and the workers (subprocesses) talk to this Label Studio and Redis."""
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("EGM_BULK_BATCH_SIZE", BATCH)
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    from egm.config.settings import reload_settings

    return reload_settings()


class Workers:
    def __init__(self, settings, label_studio, tmp: Path, **env: str) -> None:
        self.settings, self.tmp = settings, tmp
        self.env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                    "EGM_LOCAL_FILES_ROOT": str(label_studio.local_files_root), "EGM_BULK_BATCH_SIZE": BATCH, **env}
        self.procs: dict[str, object] = {}

    def start(self, *names: str, **env: str) -> "Workers":
        for name in names:
            self.procs[name] = spawn_worker(self.settings, self.tmp / f"{name}.log", "--name", name,
                                            **{**self.env, **env})
        return self

    def kill(self, name: str) -> None:
        processes.stop(self.procs.pop(name), sig=signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs.values():
            processes.stop(proc)


def predictions_by_task(label_studio, project_id: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for p in label_studio.list_predictions(project_id):
        out.setdefault(p["task"], []).append(p)
    return out


def add_image_tasks(label_studio, n: int, seed: int, poison: bool = False) -> tuple[int, list[int], dict[str, str]]:
    pid = label_studio.create_project(BOXES_CONFIG)
    files = {f"i{i:03d}.png": image_bytes(i, seed) for i in range(n)}
    if poison:
        files["zz-poison.jpg"] = CORRUPT_JPEG
    urls = label_studio.add_local_files(pid, files)
    ids = label_studio.import_tasks(pid, [{"image": urls[name]} for name in sorted(files)])
    return pid, ids, urls


def wait_until(predicate, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def engine_queries(settings) -> float:
    queue = QueueClient(settings)
    return StatsStore(queue.redis, queue.prefix).snapshot().get("egm_engine_queries_total", 0.0)


def test_bulk_run_predicts_every_task_once_keeps_failures_and_reruns_compute_nothing(label_studio, ls_env,
                                                                                      tmp_path):
    pid, ids, urls = add_image_tasks(label_studio, 299, seed=1, poison=True)
    poisoned = ids[-1]  # zz-poison.jpg sorts last
    workers = Workers(ls_env, label_studio, tmp_path).start("a", "b")
    try:
        code, summary = run_cli("prelabel", "--project", str(pid), "--json", "--quiet", "--timeout", "120")
        assert code == 3, summary  # done, with a failed task
        mv = summary["progress"]["model_version"]
        assert summary["progress"]["done"] == 299 and summary["progress"]["failed"] == 1
        (failed,) = summary["failed"]
        assert failed["task_id"] == poisoned and failed["kind"] == "image:decode" and "corrupt" in failed["error"]
        preds = predictions_by_task(label_studio, pid)
        assert set(preds) == set(ids) - {poisoned}
        assert all(len(p) == 1 and p[0]["model_version"] == mv for p in preds.values())
        assert label_studio.client().get_project(pid).model_version == mv  # Label Studio shows this version

        # the same command again: everything is predicted or failed for good, nothing is computed
        computed = engine_queries(ls_env)
        code, again = run_cli("prelabel", "--project", str(pid), "--json", "--quiet", "--timeout", "60")
        assert code == 3 and again["progress"]["enqueued"] == 0
        assert engine_queries(ls_env) == computed
        assert Counter(len(p) for p in predictions_by_task(label_studio, pid).values()) == {1: 299}

        # the same images in another project: all answered from the cache
        pid2, ids2, _ = add_image_tasks(label_studio, 299, seed=1)
        code, other = run_cli("prelabel", "--project", str(pid2), "--json", "--quiet", "--timeout", "120")
        assert code == 0, other
        assert other["progress"]["cached"] == 299 and engine_queries(ls_env) == computed
        preds2 = predictions_by_task(label_studio, pid2)
        assert set(preds2) == set(ids2) and all(len(p) == 1 for p in preds2.values())
    finally:
        workers.stop()


def test_a_no_wait_run_ends_on_the_worker_done_and_shown_in_label_studio(label_studio, ls_env, tmp_path):
    """`prelabel --no-wait` returns at once; the worker of the last batch completes the run: it reads done
    in `status` and the project's model version becomes the run's. --keep-project-version is respected."""
    pid, ids, _ = add_image_tasks(label_studio, 20, seed=3)
    kept_pid, kept_ids, _ = add_image_tasks(label_studio, 4, seed=4)
    queue = QueueClient(ls_env)
    runs = RunStore(queue.redis, queue.prefix)
    workers = Workers(ls_env, label_studio, tmp_path).start("a")
    try:
        wait_until(lambda: run_cli("status", "--json")[1]["workers"] >= 1, timeout_s=60, what="a ready worker")
        code, _ = run_cli("prelabel", "--project", str(pid), "--no-wait", "--quiet")
        assert code == 0
        code, _ = run_cli("prelabel", "--project", str(kept_pid), "--no-wait", "--quiet", "--keep-project-version")
        assert code == 0
        by_project = {runs.spec(r)["project_id"]: r for r in runs.runs()}
        run_id, kept_run = by_project[pid], by_project[kept_pid]
        wait_until(lambda: runs.progress(run_id).state == "done" and runs.progress(kept_run).state == "done",
                   timeout_s=120, what="both runs to read done")
        progress = runs.progress(run_id)
        assert (progress.done, progress.failed, progress.remaining) == (20, 0, 0)
        code, status = run_cli("status", run_id, "--json")
        assert code == 0 and status["progress"]["state"] == "done"
        client = label_studio.client()
        assert client.get_project(pid).model_version == progress.model_version
        assert client.get_project(kept_pid).model_version != progress.model_version
        preds = predictions_by_task(label_studio, pid)
        assert set(preds) == set(ids) and all(len(p) == 1 for p in preds.values())
    finally:
        workers.stop()


def _running_job_of(queue: QueueClient, worker_name: str) -> str | None:
    """The bulk job ``worker_name`` is executing right now, if any (from RQ's started registry)."""
    for job_id in StartedJobRegistry(queue=queue.queue(Priority.bulk, version_of())).get_job_ids():
        job = queue.fetch_job(job_id)
        if job.worker_name == worker_name and job.get_status() == "started":
            return job_id
    return None


def test_killed_worker_and_interrupted_cli_still_predict_every_task_exactly_once(label_studio, ls_env, tmp_path):
    pid, ids, urls = add_image_tasks(label_studio, 160, seed=2)
    queue = QueueClient(ls_env)
    runs = RunStore(queue.redis, queue.prefix)
    workers = Workers(ls_env, label_studio, tmp_path, EGM_SCRIPTED_DELAY_S="0.25").start("b")
    workers.start("a", EGM_SCRIPTED_DELAY_S="5")  # a's batches are long: it is surely inside one when killed
    env = {**worker_env(ls_env), "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "EGM_BULK_BATCH_SIZE": BATCH}
    cli = processes.spawn(["prelabel", "--project", str(pid), "--quiet"], env, tmp_path / "cli.log")
    try:
        run_id = wait_until(lambda: next(iter(runs.runs()), None), what="the run to appear")
        wait_until(lambda: (runs.progress(run_id).done >= 16), what="some predictions")

        # an interactive request is served while the bulk run still has most of its batches queued
        interactive = BatchJob(priority=Priority.interactive, model_version=version_of(), target=TARGET,
                               deliver_late=False, tasks=[TaskJob(ref="typed", image=urls["i000.png"], queries=[
                                   Query(text="Locate the circle, output its bbox coordinates using JSON format")])])
        queue.enqueue(interactive)
        assert queue.wait_any([interactive.job_id], time.time() + 60) == interactive.job_id
        assert queue.result(interactive.job_id).results[0].status == "ok"
        assert runs.progress(run_id).resolved < 160

        abandoned = wait_until(lambda: _running_job_of(queue, "a"), what="worker a to be inside a batch")
        workers.kill("a")  # SIGKILL in the middle of a batch
        assert queue.fetch_job(abandoned).get_status() == "started"
        processes.stop(cli, sig=signal.SIGINT)  # Ctrl-C on the CLI
        assert cli.returncode == 130
        workers.start("c")  # a replacement worker
        code, summary = run_cli("prelabel", "--project", str(pid), "--json", "--quiet", "--timeout", "180")
        assert code == 0, summary
    finally:
        processes.stop(cli)
        workers.stop()
    assert summary["progress"]["done"] == 160 and summary["failed"] == []
    # the killed worker's batch itself was taken up again (after its heartbeat expired) by another worker
    assert queue.fetch_job(abandoned).get_status() == "finished"
    preds = predictions_by_task(label_studio, pid)
    assert set(preds) == set(ids)
    assert all(len(p) == 1 and p[0]["model_version"] == summary["progress"]["model_version"] for p in preds.values())


def test_next_lists_the_most_uncertain_unlabeled_tasks_and_saves_a_view(label_studio, ls_env):
    pid = label_studio.create_project(BOXES_CONFIG)
    ids = label_studio.import_tasks(pid, [{"image": f"https://example.com/{i}.jpg"} for i in range(8)])
    scores = [0.9, 0.2, 0.6, 0.1, 0.5, 0.3, 0.8, None]
    client = label_studio.client()
    client.create_predictions(pid, [{"task": t, "result": [], "score": s, "model_version": "al-v1"}
                                    for t, s in zip(ids, scores)])
    client.create_predictions(pid, [{"task": ids[0], "result": [], "score": 0.01, "model_version": "old-v0"}])
    label_studio.create_annotation(ids[1], [])  # labelled already: never "next"

    code, _ = run_cli("next", "--project", str(pid), "-n", "3", "--model-version", "al-v1")
    assert code == 1  # the project shows another version: refused without --set-project-version
    code, out = run_cli("next", "--project", str(pid), "-n", "3", "--model-version", "al-v1",
                        "--set-project-version", "--save-view", "label next", "--json")
    assert code == 0, out
    assert [t["id"] for t in out["tasks"]] == [ids[3], ids[5], ids[4]]  # scores 0.1, 0.3, 0.5
    assert out["candidates"] == 7 and out["unpredicted"] == 0
    listed = label_studio.call("GET", "/api/tasks/", params={"project": pid, "view": out["view"]["id"]})
    assert [t["id"] for t in listed["tasks"]] == [ids[3], ids[5], ids[4]]
    # the project's version is now ours, so the next call needs no flags and ranks all candidates
    code, everything = run_cli("next", "--project", str(pid), "-n", "10", "--json")
    assert [t["id"] for t in everything["tasks"]] == [ids[3], ids[5], ids[4], ids[2], ids[6], ids[0], ids[7]]
