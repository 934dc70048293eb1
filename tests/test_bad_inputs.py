"""Bad input end to end: backend -> Redis -> worker subprocess -> answer, each bad task failing alone.

The loaders' unit tests (tests/test_images.py) check every malformed file one by one; here
the same files travel as tasks of ONE /predict call (one batch job) between good images, to
show that the failure stays with its task through the whole stack and carries a clear reason.
"""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from egm.backend.app import create_app
from egm import processes
from egm.contract import BatchResult
from tests import images_factory as f
from tests.image_server import ImageServer, Route
from tests.stack import BOXES_CONFIG, sample_images, spawn_worker, wait_ready

#: name -> (bytes, expected error kind or None when the file must load, words in the reason)
HOSTILE = {
    "zero.jpg": (f.ZERO_BYTES, "image:decode", "0 bytes"),
    "truncated.jpg": (f.make_truncated_jpeg(), "image:decode", "truncated"),
    "truncated.png": (f.make_truncated_png(), "image:decode", "truncated"),
    "huge-header.png": (f.make_bomb_png(100_000, 100_000), "image:too_large", "too large"),
    "bomb.png": (f.make_bomb_png(9_000, 9_000), "image:too_large", "9000x9000"),
    "vector.svg": (f.make_svg(), "image:unsupported", "SVG"),
    "svg-named.jpg": (f.make_svg(), "image:unsupported", "SVG"),
    "login.jpg": (f.make_html(), "image:unsupported", "HTML"),
}
#: odd but valid files: they must load (converted to RGB), with their real size
ODD = {
    "cmyk.jpg": (f.make_cmyk_jpeg(40, 30), (40, 30)),
    "grey16.png": (f.make_16bit_png(24, 12), (24, 12)),
    "palette-alpha.png": (f.make_palette_alpha_png(32, 16), (32, 16)),
    "animated.gif": (f.make_animated_gif(18, 14), (18, 14)),
    "png-named.jpg": (f.make_png(20, 10), (20, 10)),  # wrong extension
}


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    for p in sample_images():
        shutil.copy(p, root / p.name)
    for name, (data, *_rest) in {**HOSTILE, **ODD}.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture()
def settings(egm_env, monkeypatch, media):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(media))
    monkeypatch.setenv("EGM_PREDICT_BUDGET_S", "60")
    monkeypatch.setenv("EGM_BATCH_SIZE", "32")  # every task of a call in one batch job
    monkeypatch.setenv("EGM_MAX_IMAGE_PIXELS", "50000000")
    monkeypatch.setenv("EGM_MAX_PREDICT_BYTES", str(12 * 1024 * 1024))  # the 413 test sends one over it
    from egm.config.settings import reload_settings

    return reload_settings()


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def image_server():
    png = f.make_png(16, 12)
    routes = {"/ok.png": Route(200, png, {"Content-Type": "image/png"}), "/500.png": Route(500, b"boom"),
              "/slow.png": Route(200, png, hang=True)}
    with ImageServer(routes) as srv:
        yield srv


def _worker(settings, tmp_path, media, **extra):
    proc = spawn_worker(settings, tmp_path / "worker.log", EGM_LOCAL_FILES_ROOT=str(media),
                        EGM_MAX_IMAGE_PIXELS=str(settings.max_image_pixels), **extra)
    try:
        wait_ready(settings, 60, proc)  # /predict plans for the version the live worker serves
    except BaseException:
        processes.stop(proc)
        raise
    return proc


def _predict(client, images: list[str]) -> list:
    tasks = [{"id": i + 1, "data": {"image": img}} for i, img in enumerate(images)]
    resp = client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": BOXES_CONFIG})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == len(tasks)  # one entry per task, in order, whatever happened
    return results


def _stored(client) -> dict[int, object]:
    """Task id -> TaskResult of every batch the workers finished (the reasons /predict does not show)."""
    queue = client.app.state.queue
    out = {}
    for key in queue.redis.scan_iter(queue.keys.result("*")):
        for r in BatchResult.model_validate_json(queue.redis.get(key)).results:
            out[r.task_id] = r
    return out


def _rects(prediction) -> list[dict]:
    return [i for i in prediction["result"] if i["type"] == "rectanglelabels"]


def test_malformed_images_fail_only_their_own_task(client, settings, tmp_path, media):
    good = [p.name for p in sample_images()]
    names = []
    for i, bad in enumerate([*HOSTILE, *ODD]):
        names += [good[i % len(good)], bad]
    proc = _worker(settings, tmp_path, media)
    try:
        results = _predict(client, [str(media / n) for n in names])
    finally:
        processes.stop(proc)
    stored = _stored(client)
    assert set(stored) == set(range(1, len(names) + 1))  # every task has a result, good or failed
    for task_id, (name, prediction) in enumerate(zip(names, results), 1):
        r = stored[task_id]
        if name in HOSTILE:
            _, kind, words = HOSTILE[name]
            assert prediction == [], name
            assert r.status == "failed" and r.error_kind == kind, (name, r.error_kind, r.error)
            assert words in r.error and name in r.error, (name, r.error)  # what went wrong, and which file
        else:
            assert r.status == "ok", (name, r.error)
            assert _rects(prediction), name
            if name in ODD:
                assert (r.width, r.height) == ODD[name][1]
                assert _rects(prediction)[0]["original_width"] == ODD[name][1][0]


def test_http_404_500_and_slow_image_urls_fail_only_their_task(client, settings, tmp_path, media, image_server):
    urls = [str(media / "shapes.jpg"), image_server.url("/missing.png"), image_server.url("/ok.png"),
            image_server.url("/500.png"), image_server.url("/slow.png"), str(media / "wide.jpg")]
    proc = _worker(settings, tmp_path, media, EGM_ALLOWED_HOSTS=f"127.0.0.1:{image_server.port}",
                   EGM_ALLOW_PRIVATE_NETWORKS="true", EGM_IMAGE_TIMEOUT_S="1.5")
    try:
        results = _predict(client, urls)
    finally:
        processes.stop(proc)
    assert [bool(r) for r in results] == [True, False, True, False, False, True]
    stored = _stored(client)
    reasons = {2: "HTTP 404", 4: "HTTP 500", 5: "timed out"}
    for task_id, words in reasons.items():
        assert stored[task_id].error_kind == "image:fetch" and words in stored[task_id].error, stored[task_id].error


def test_labels_the_config_does_not_have_are_dropped(client, settings, tmp_path, media):
    answer = ("Two shapes.\n</think>\n\n```json\n[\n"
              "\t{{\"bbox_2d\": [10, 10, 200, 200], \"label\": \"Circle\"}},\n"
              "\t{{\"bbox_2d\": [300, 300, 500, 500], \"label\": \"dragon\"}},\n"
              "\t{{\"bbox_2d\": [600, 600, 700, 700], \"label\": \"square\"}}\n]\n```")
    proc = _worker(settings, tmp_path, media, EGM_SCRIPTED_RESPONSE=answer)
    try:
        results = _predict(client, [str(media / "shapes.jpg")])
    finally:
        processes.stop(proc)
    labels = [i["value"]["rectanglelabels"] for i in _rects(results[0])]
    assert labels == [["circle"], ["square"]]  # "Circle" matched case-insensitively, "dragon" dropped
    r = _stored(client)[1]
    assert [b.model_label for b in r.boxes] == ["Circle", "square"]
    assert "dragon" in r.completions[0]  # the raw answer is kept for review


NO_RECTANGLES = {
    "choices only": "<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/>"
                    "</Choices></View>",
    "polygons only": "<View><Image name='i' value='$image'/><PolygonLabels name='p' toName='i'>"
                     "<Label value='a'/></PolygonLabels></View>",
    "no image": "<View><Text name='t' value='$text'/><Labels name='l' toName='t'><Label value='a'/></Labels></View>",
    "empty view": "<View></View>",
    "not xml": "rectangles please",
}


@pytest.mark.parametrize("name", list(NO_RECTANGLES))
def test_configs_without_rectangles_are_refused_with_a_reason(client, name):
    config = NO_RECTANGLES[name]
    setup = client.post("/setup", json={"project": "1.1", "schema": config})
    assert setup.status_code == 422 and setup.json()["detail"]
    resp = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "x.jpg"}}], "label_config": config})
    assert resp.status_code == 422 and resp.json()["detail"]
    queue = client.app.state.queue
    assert sum(d["queued"] for d in queue.depths().values()) == 0  # nothing was enqueued


@pytest.mark.parametrize("size", [1_001, 100_000, 2_000_000])
def test_enormous_prompts_are_refused_before_anything_is_queued(client, settings, size):
    config = BOXES_CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')
    context = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["x" * size]}}]}
    resp = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "shapes.jpg"}}],
                                         "label_config": config, "params": {"context": context}})
    assert resp.status_code == 422
    assert f"{size} characters" in resp.json()["detail"] and "EGM_MAX_PROMPT_CHARS" in resp.json()["detail"]
    assert len(resp.content) < 1000  # the refusal does not echo the prompt
    assert sum(d["queued"] for d in client.app.state.queue.depths().values()) == 0


def test_prompt_beyond_the_body_limit_is_413(client, settings):
    body = b'{"tasks": [{"id": 1, "data": {"image": "a.jpg"}}], "params": {"context": "' + \
        b"x" * settings.max_predict_bytes + b'"}}'
    resp = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 413
