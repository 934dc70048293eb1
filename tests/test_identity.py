"""One identity per model: the worker's model_version follows what it really serves.

A checkpoint fine-tuned in place (same files, sizes and config) gets a new version; an unchanged one
keeps its version without being hashed again; another model behind the same OpenAI-compatible URL
is a new version and recomputes every task; a scripted and a transformers worker never share a cache
entry. Real Redis, real worker loops, the real transformers engine on the tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import time
from pathlib import Path

import pytest

from egm.contract import Priority
from egm.queue import QueueClient
from egm.worker.batch_worker import run_worker
from egm.worker.engines.scripted import ScriptedEngine
from egm.worker.fingerprint import CACHE_FILE, checkpoint_fingerprint
from tests.fixtures.model import TEST_MAX_NEW_TOKENS, TEST_MAX_PIXELS, TEST_MIN_PIXELS
from tests.openai_test_server import OpenAITestServer, ServerBehavior
from tests.stack import SAMPLES, batch_job, sample_images, spawn_worker, version_of, wait_ready


@pytest.fixture()
def settings(egm_env, monkeypatch, tmp_path):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_HEARTBEAT_S", "1")
    monkeypatch.setenv("EGM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EGM_DEVICE", "cpu")
    monkeypatch.setenv("EGM_MAX_NEW_TOKENS", str(TEST_MAX_NEW_TOKENS))
    monkeypatch.setenv("EGM_MAX_PIXELS", str(TEST_MAX_PIXELS))
    monkeypatch.setenv("EGM_MIN_PIXELS", str(TEST_MIN_PIXELS))
    from egm.config.settings import reload_settings

    return reload_settings()


@pytest.fixture()
def checkpoint(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to fine-tune in place."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "EGM-tiny", ignore=shutil.ignore_patterns(".*")))


def rewrite_tensor(path: Path, name_part: str = "", keep_stat: bool = False) -> str:
    """Change every value of one tensor in a .safetensors file, in place: the file keeps its size (and,
    with ``keep_stat``, its inode and mtime), as a fine-tuned checkpoint saved over its parent does."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        name = next(k for k in sorted(header) if k != "__metadata__" and name_part in k
                    and header[k]["data_offsets"][1] > header[k]["data_offsets"][0])
        begin, end = header[name]["data_offsets"]
        f.seek(8 + header_len + begin)
        data = bytearray(f.read(end - begin))
        f.seek(8 + header_len + begin)
        f.write(bytes(b ^ 0x5A for b in data))
    if keep_stat:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert after.st_size == before.st_size
    if keep_stat:
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    return name


# --------------------------------------------------------------------------- local checkpoints


def test_fine_tuning_a_checkpoint_in_place_changes_the_version(settings, checkpoint):
    from egm.worker.engines import create_engine

    def version_of_checkpoint() -> str:
        engine = create_engine(settings.model_copy(update={"model_dir": str(checkpoint), "engine": "hf"}))
        try:
            return version_of(engine, settings)
        finally:
            engine.close()

    first = version_of_checkpoint()
    assert first.startswith("EGM-tiny-")
    assert version_of_checkpoint() == first  # unchanged: the same version
    names = sorted(p.name for p in checkpoint.iterdir())
    sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    rewrite_tensor(checkpoint / "model.safetensors")  # "fine-tuned": weights changed, nothing else
    assert sorted(p.name for p in checkpoint.iterdir()) == names
    assert {p.name: p.stat().st_size for p in checkpoint.iterdir()} == sizes
    second = version_of_checkpoint()
    assert second != first and second.startswith("EGM-tiny-")


def test_an_unchanged_checkpoint_is_hashed_once_and_a_stale_cache_entry_is_never_trusted(checkpoint, tmp_path):
    first = checkpoint_fingerprint(checkpoint, tmp_path / "state")
    assert first.hashed_bytes == sum(p.stat().st_size for p in checkpoint.iterdir() if not p.name.startswith("."))
    assert first.cache_path == str(checkpoint / CACHE_FILE)  # beside the checkpoint: it is writable
    again = checkpoint_fingerprint(checkpoint, tmp_path / "state")
    assert (again.digest, again.hashed_bytes, again.cached_files) == (first.digest, 0, len(first.files))

    # new weights written over the old ones with the same size, inode AND mtime (cp -p, image layers):
    # the cached hash matches the file's stat, but the sampled digest does not, so it is hashed again
    rewrite_tensor(checkpoint / "model.safetensors", keep_stat=True)
    changed = checkpoint_fingerprint(checkpoint, tmp_path / "state")
    assert changed.digest != first.digest
    assert changed.hashed_bytes == (checkpoint / "model.safetensors").stat().st_size
    # a README is not the model
    (checkpoint / "README.md").write_text("fine-tuned on week 12")
    assert checkpoint_fingerprint(checkpoint, tmp_path / "state").digest == changed.digest
    # a chat template is
    (checkpoint / "chat_template.jinja").write_text((checkpoint / "chat_template.jinja").read_text() + " ")
    assert checkpoint_fingerprint(checkpoint, tmp_path / "state").digest != changed.digest


def test_a_checkpoint_it_cannot_write_into_keeps_its_fingerprint_cache_in_the_state_dir(checkpoint, tmp_path):
    # nothing can be written at the cache's place beside the checkpoint (a read-only mount; as root,
    # which writes anywhere, a folder standing where the file would go does the same)
    (checkpoint / CACHE_FILE).mkdir()
    if os.geteuid() != 0:
        checkpoint.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        first = checkpoint_fingerprint(checkpoint, tmp_path / "state")
        assert first.cache_path and first.cache_path.startswith(str(tmp_path / "state"))
        again = checkpoint_fingerprint(checkpoint, tmp_path / "state")
        assert (again.digest, again.hashed_bytes) == (first.digest, 0)
    finally:
        checkpoint.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------- two engines, two caches


def test_a_scripted_and_a_transformers_worker_never_share_cache_entries(settings, tiny_model_dir):
    from egm.worker.engines import create_engine

    queue = QueueClient(settings)
    images = sample_images()
    scripted = ScriptedEngine()
    hf = create_engine(settings.model_copy(update={"model_dir": str(tiny_model_dir), "engine": "hf"}))
    try:
        v_scripted, v_hf = version_of(scripted, settings), version_of(hf, settings)
        assert v_scripted.startswith("scripted-") and v_hf.startswith("tiny-model-") and v_scripted != v_hf

        first = batch_job(images, model_version=v_scripted)
        queue.enqueue(first)
        run_worker(settings, engine=scripted, burst=True)
        cache_keys = set(queue.redis.scan_iter(queue.keys.cache("*")))
        assert len(cache_keys) == len(images) and scripted.requests_seen == len(images)

        # the same images and prompts for the transformers worker: computed by its model, not answered from cache
        second = batch_job(images, model_version=v_hf)
        queue.enqueue(second)
        run_worker(settings, engine=hf, burst=True)
        result = queue.result(second.job_id)
        assert result.model_version == v_hf
        assert all(len(r.completions) == 1 for r in result.results)  # its own answers (24 tokens: not always boxes)
        assert not any(r.cached for r in result.results)
        scripted_texts = {c for r in queue.result(first.job_id).results for c in r.completions}
        assert not scripted_texts & {c for r in result.results for c in r.completions}
        assert len(set(queue.redis.scan_iter(queue.keys.cache("*"))) - cache_keys) == len(images)

        # control: the scripted worker's own entries still answer its jobs
        third = batch_job(images, model_version=v_scripted)
        queue.enqueue(third)
        run_worker(settings, engine=scripted, burst=True)
        assert all(r.cached for r in queue.result(third.job_id).results)
        assert scripted.requests_seen == len(images)
    finally:
        hf.close()


# --------------------------------------------------------------------------- a served model


def _predict(client, n: int) -> list:
    tasks = [{"id": i + 1, "data": {"image": str(p)}} for i, p in enumerate(sample_images()[:n])]
    from tests.stack import BOXES_CONFIG

    resp = client.post("/predict", json={"tasks": tasks, "project": "4.1700000000", "label_config": BOXES_CONFIG})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_another_model_behind_the_same_openai_url_is_a_new_version_and_recomputes_every_task(settings, tmp_path):
    from fastapi.testclient import TestClient

    from egm.backend.app import create_app
    from egm import processes

    with OpenAITestServer(ServerBehavior(model="egm-week11", root="/models/egm-week11")) as server:
        proc = spawn_worker(settings, tmp_path / "worker.log", EGM_ENGINE="openai",
                            EGM_OPENAI_BASE_URL=server.base_url)
        try:
            week11 = wait_ready(settings, 60, proc)
            assert week11.startswith("egm-week11-")
            with TestClient(create_app(settings)) as client:
                results = _predict(client, 4)
                assert all(r and r["model_version"] == week11 for r in results)
                assert server.stats.chat_calls == 4
                _predict(client, 4)
                assert server.stats.chat_calls == 4  # the same model: answered from the cache

                # the server now serves the next week's model under another id, at the same URL
                server.behavior.model, server.behavior.root = "egm-week12", "/models/egm-week12"
                deadline = time.monotonic() + 60
                while client.get("/health").json()["model_version"] == week11:
                    assert time.monotonic() < deadline and proc.poll() is None, "the worker did not notice"
                    time.sleep(0.2)
                week12 = client.get("/health").json()["model_version"]
                assert week12.startswith("egm-week12-")
                results = _predict(client, 4)
                assert all(r and r["model_version"] == week12 for r in results)
                assert server.stats.chat_calls == 8  # every task computed again, by the new model
                assert {b["model"] for b in server.stats.requests} == {"egm-week11", "egm-week12"}
            assert "the served model changed" in (tmp_path / "worker.log").read_text()
        finally:
            processes.stop(proc)


def test_the_served_id_root_and_url_make_the_identity(settings):
    from egm.worker.engines.base import DecodingConfig
    from egm.worker.engines.openai_compat import OpenAICompatEngine
    from egm.worker.identity import identify

    with OpenAITestServer(ServerBehavior(model="EGM-4B", root="/models/a")) as server:
        engine = OpenAICompatEngine(server.base_url.replace("127.0.0.1", "u:pw@127.0.0.1"), DecodingConfig(),
                                    max_pixels=TEST_MAX_PIXELS)
        try:
            first = identify(engine, settings)
            assert first.model["served_id"] == "EGM-4B" and first.model["root"] == "/models/a"
            assert "pw" not in json.dumps(first.summary())  # no credentials in what is published
            server.behavior.root = "/models/b"  # same served name, another checkpoint behind it
            assert identify(engine, settings).model_version != first.model_version
        finally:
            engine.close()


def test_a_job_planned_for_another_version_is_never_computed_under_this_workers_name(settings):
    """Queues keep versions apart; a job pushed into the wrong queue by hand is refused, not computed."""
    queue = QueueClient(settings)
    engine = ScriptedEngine()
    stray = batch_job(sample_images()[:2], model_version="EGM-4B-0123456789")
    mine = version_of(engine, settings)
    queue.queue(Priority.bulk, mine).enqueue_call("egm.worker.rq_entry.run_batch", args=(stray.model_dump(mode="json"),),
                                                  job_id=stray.job_id)
    run_worker(settings, engine=engine, burst=True)
    result = queue.result(stray.job_id)
    assert engine.requests_seen == 0 and not list(queue.redis.scan_iter(queue.keys.cache("*")))
    assert result.model_version == "EGM-4B-0123456789"
    assert all(r.status == "failed" and r.error_kind == "version" and mine in r.error and not r.ls_result
               for r in result.results)
