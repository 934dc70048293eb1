"""Label Studio as annotators use it (issue 10), at the API level: score column, typed prompts, no
duplicate suggestions, visible failures, "Retrieve predictions" on a large project.

Real Label Studio 1.23 (tests/fixtures/labelstudio.py), real backend and worker processes
(scripted engine: EGM-format answers with a stable box and stable token log-probabilities per image).
The first tests need no Label Studio: they call the backend as Label Studio does.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from egm import processes
from egm.backend.app import create_app
from tests import images_factory
from tests.stack import BOXES_CONFIG, SAMPLES, running_worker, sample_images, spawn_worker, wait_ready
from tests.test_e2e_labelstudio import Stack

LABELING = Path(__file__).resolve().parent.parent / "config" / "labeling"
CONFIG = (LABELING / "boxes_reasoning.xml").read_text()  # Person / Vehicle / Animal, prompt + message TextAreas
PROMPT_CONFIG = BOXES_CONFIG.replace(
    "</View>", '<TextArea name="prompt" toName="image"/><TextArea name="message" toName="image"/></View>')


def _prompt(text: str, *extra: dict) -> dict:
    return {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": [text]}},
                       *extra]}


def _rects(result: list[dict]) -> list[dict]:
    return [r for r in result if r["type"] == "rectanglelabels"]


def _message(result: list[dict]) -> str:
    texts = [r["value"]["text"][0] for r in result if r["type"] == "textarea" and r["from_name"] == "message"]
    assert len(texts) == 1, result
    return texts[0]


def _wait(check, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


# --------------------------------------------------------------------------- backend only (no Label Studio)


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    from egm.config.settings import reload_settings

    return reload_settings()


@pytest.fixture()
def worker(settings, tmp_path):
    with running_worker(settings, tmp_path / "worker.log") as proc:
        yield proc


def _predict(client, context, config=PROMPT_CONFIG, image="shapes.jpg", **task_extra):
    task = {"id": 7, "data": {"image": str(SAMPLES / image)}, **task_extra}
    resp = client.post("/predict", json={"tasks": [task], "project": "3.1", "label_config": config,
                                         "params": {"context": context}})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"][0]


def test_submit_context_suggests_nothing_and_queues_nothing(settings):
    with TestClient(create_app(settings)) as client:  # no worker at all: nothing may be planned
        assert _predict(client, {"result": []}) == []
        assert sum(d["queued"] for d in client.app.state.queue.depths().values()) == 0


def test_prompt_label_comes_from_the_expression_or_the_default_never_the_first_label(settings, worker, monkeypatch):
    with TestClient(create_app(settings)) as client:
        named = _predict(client, _prompt("the two squares on the right"))
        assert [r["value"]["rectanglelabels"] for r in _rects(named["result"])] == [["square"]]
        unnamed = _predict(client, _prompt("the yellow one"))
        assert "which label" in _message(unnamed["result"]) and unnamed["score"] == 0
        assert not _rects(unnamed["result"])
        # a label selected in the context (when Label Studio sends one) wins over the expression
        selected = {"type": "rectanglelabels", "from_name": "label", "value": {"rectanglelabels": ["square"]}}
        picked = _predict(client, _prompt("the circle", selected))
        assert [r["value"]["rectanglelabels"] for r in _rects(picked["result"])] == [["square"]]
    monkeypatch.setenv("EGM_PROMPT_DEFAULT_LABEL", "circle")
    from egm.config.settings import reload_settings

    with TestClient(create_app(reload_settings())) as client:
        defaulted = _predict(client, _prompt("the yellow one"))
        assert [r["value"]["rectanglelabels"] for r in _rects(defaulted["result"])] == [["circle"]]
        # the labeling config's own default wins over the setting
        marked = PROMPT_CONFIG.replace('<Label value="square"', '<Label value="square" default="true"')
        assert marked != PROMPT_CONFIG
        by_config = _predict(client, _prompt("the yellow one"), config=marked)
        assert [r["value"]["rectanglelabels"] for r in _rects(by_config["result"])] == [["square"]]


def test_prompted_box_overlapping_a_region_of_the_task_is_not_suggested_again(settings, worker):
    with TestClient(create_app(settings)) as client:
        first = _predict(client, _prompt("the circle"))
        rect = _rects(first["result"])[0]
        existing = {"type": "rectanglelabels", "from_name": "label", "to_name": "image",
                    "value": {**rect["value"], "rectanglelabels": ["square"]}}
        # the annotator's region in the context ...
        again = _predict(client, _prompt("the circle", existing))
        assert not _rects(again["result"]) and "already has" in _message(again["result"])
        # ... or the task's existing prediction of the same object
        again = _predict(client, _prompt("the circle"), predictions=[{"result": [existing], "model_version": "x"}])
        assert not _rects(again["result"]) and "already has" in _message(again["result"])
        # a region elsewhere does not hide the suggestion
        far = {**existing, "value": {"x": 0, "y": 0, "width": 1, "height": 1, "rectanglelabels": ["circle"]}}
        assert len(_rects(_predict(client, _prompt("the circle", far))["result"])) == 1


def test_interactive_failures_answer_a_message(settings, tmp_path):
    with TestClient(create_app(settings)) as client:
        no_worker = _predict(client, _prompt("the circle"))
        assert "no model" in _message(no_worker["result"]) and no_worker["score"] == 0
        # a config without a message TextArea keeps the old answer
        bare = BOXES_CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')
        assert _predict(client, _prompt("the circle"), config=bare) == []
    proc = spawn_worker(settings, tmp_path / "worker.log")
    try:
        wait_ready(settings, 60, proc)
        with TestClient(create_app(settings)) as client:
            broken = _predict(client, _prompt("the circle"), image="missing.jpg")
            assert "missing.jpg" in _message(broken["result"]) and broken["score"] == 0
    finally:
        processes.stop(proc)


def test_setup_answers_at_once_when_label_studio_is_unreachable(settings, worker, monkeypatch):
    """The score-column sync talks to Label Studio in the background: /setup never waits for it or fails."""
    monkeypatch.setenv("LABEL_STUDIO_URL", f"http://127.0.0.1:{processes.free_port()}")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    from egm.config.settings import reload_settings

    with TestClient(create_app(reload_settings())) as client:
        resp = client.post("/setup", json={"project": "3.1700000000", "schema": PROMPT_CONFIG})
        assert resp.status_code == 200 and resp.json()["model_version"] == client.get("/health").json()["model_version"]


# --------------------------------------------------------------------------- with the real Label Studio


def _ls_tasks(label_studio, project: int, **params) -> list[dict]:
    body = label_studio.call("GET", "/api/tasks/", params={"project": project, "fields": "all", "page_size": 100,
                                                            **params})
    return body["tasks"] if isinstance(body, dict) else body


def _retrieve(label_studio, project: int) -> None:
    label_studio.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                      json={"selectedItems": {"all": True, "excluded": []}})


def _shows(label_studio, project: int, version: str) -> bool:
    """The project and its ML backend both name ``version`` (the score column's condition)."""
    titles = [b["title"] for b in label_studio.call("GET", "/api/ml/", params={"project": project})]
    return titles == [version] and label_studio.call("GET", f"/api/projects/{project}/")["model_version"] == version


def _ordered_ids(label_studio, project: int, ordering: str) -> list[int]:
    view = label_studio.call("POST", "/api/dm/views/", json={"project": project, "data": {"ordering": [ordering]}})
    return [t["id"] for t in _ls_tasks(label_studio, project, view=view["id"])]


def _check_score_column(label_studio, project: int, task_ids: list[int], version: str) -> None:
    tasks = {t["id"]: t for t in _ls_tasks(label_studio, project)}
    scores = {i: tasks[i]["predictions_score"] for i in task_ids}
    assert all(s is not None for s in scores.values()), scores
    preds = [p for p in label_studio.list_predictions(project) if p["model_version"] == version]
    for p in preds:  # the column is the mean of this version's prediction scores
        assert scores[p["task"]] == pytest.approx(p["score"], abs=1e-4)
    by_score = sorted(task_ids, key=lambda i: scores[i])
    assert by_score != sorted(task_ids)  # the scripted scores differ per image: a real reordering
    assert _ordered_ids(label_studio, project, "tasks:predictions_score") == by_score
    assert _ordered_ids(label_studio, project, "-tasks:predictions_score") == by_score[::-1]


OTHER_SCRIPT = ("Found the {label}.\n</think>\n\n```json\n"
                "[{{\"bbox_2d\": [{x1}, {y1}, {x2}, {y2}], \"label\": \"{label}\"}}]\n```")


def test_score_column_sorts_by_the_live_version_across_version_changes(label_studio, redis_url, tmp_path):
    stack = Stack(label_studio, redis_url, tmp_path).start()
    try:
        project = label_studio.create_project(CONFIG)
        task_ids = [label_studio.upload_image(project, p)[0] for p in sample_images()]
        label_studio.connect_ml_backend(project, stack.url)
        v1 = stack.model_version()
        _wait(lambda: _shows(label_studio, project, v1), what=f"project and ML backend named {v1}")
        _retrieve(label_studio, project)
        _wait(lambda: len(label_studio.list_predictions(project)) >= len(task_ids), what="predictions")
        _check_score_column(label_studio, project, task_ids, v1)

        # a new model: the worker is replaced by one with another script (another model_version)
        processes.stop(stack.procs.pop())
        stack.procs.append(processes.spawn(["worker", "--name", "w-next"], {**stack.env,
                                           "EGM_SCRIPTED_RESPONSE": OTHER_SCRIPT}, tmp_path / "worker-next.log"))
        v2 = _wait(lambda: (stack.model_version() not in (None, v1)) and stack.model_version(), what="new version")
        _retrieve(label_studio, project)  # Label Studio calls /setup first: the backend renames itself
        _wait(lambda: _shows(label_studio, project, v2), what=f"project and ML backend named {v2}")
        _wait(lambda: sum(p["model_version"] == v2 for p in label_studio.list_predictions(project)) >= len(task_ids),
              what="predictions of the new version")
        _check_score_column(label_studio, project, task_ids, v2)
        # live predictions go on: a new task gets a prediction of the live version when asked
        new_task, _ = label_studio.upload_image(project, sample_images()[0], filename="again.jpg")
        _retrieve(label_studio, project)
        _wait(lambda: [p["model_version"] for p in label_studio.list_predictions(project) if p["task"] == new_task],
              what="prediction of the new task")
        assert {p["model_version"] for p in label_studio.list_predictions(project) if p["task"] == new_task} == {v2}
    finally:
        stack.stop()


def test_score_column_sync_with_a_basic_auth_backend(label_studio, redis_url, tmp_path):
    """Label Studio validates an ML backend update like a new connection: the rename sends our credentials."""
    user, password = "ls-backend", "pw-" + "q8Rt5vXa"
    stack = Stack(label_studio, redis_url, tmp_path, BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password).start()
    try:
        project = label_studio.create_project(CONFIG)
        label_studio.call("POST", "/api/ml/", json={"url": stack.url, "project": project, "title": "egm",
                                                    "auth_method": "BASIC_AUTH", "basic_auth_user": user,
                                                    "basic_auth_pass": password})
        version = httpx.get(stack.url + "/health").json()["model_version"]
        _wait(lambda: _shows(label_studio, project, version), what=f"project and ML backend named {version}")
        for log in tmp_path.glob("*.log"):
            assert password not in log.read_text(), log.name
    finally:
        stack.stop()


def test_typed_prompts_in_label_studio(label_studio, redis_url, tmp_path):
    stack = Stack(label_studio, redis_url, tmp_path).start()
    try:
        project = label_studio.create_project(CONFIG)
        task_id, _ = label_studio.upload_image(project, sample_images()[1])
        ml = label_studio.connect_ml_backend(project, stack.url, is_interactive=True)

        def ask(context: dict) -> list[dict]:
            body = label_studio.call("POST", f"/api/ml/{ml}/interactive-annotating",
                                     json={"task": task_id, "context": context})
            return body["data"]["result"] if body["data"] else body["data"]

        # the label the expression names (through predicted_values: dog -> Animal), not the first label
        result = ask(_prompt("the small dog"))
        assert [r["value"]["rectanglelabels"] for r in _rects(result)] == [["Animal"]]
        # no label named, none configured: the annotator is told, nothing is guessed
        assert "which label" in _message(ask(_prompt("the yellow one")))
        # Submit with Auto-Annotation on: nothing new
        assert ask({"result": []}) == []
        # once the task has a prediction of that object, prompting for it again suggests nothing new
        _retrieve(label_studio, project)
        _wait(lambda: label_studio.list_predictions(project), what="prediction")
        again = ask(_prompt("the dog"))
        assert not _rects(again) and "already has" in _message(again)
    finally:
        stack.stop()


def test_interactive_failure_is_shown_in_label_studio(label_studio, redis_url, tmp_path):
    stack = Stack(label_studio, redis_url, tmp_path).start()
    try:
        project = label_studio.create_project(CONFIG)
        [task_id] = label_studio.import_tasks(project, [{"image": "/data/local-files/?d=nowhere/missing.png"}])
        ml = label_studio.connect_ml_backend(project, stack.url, is_interactive=True)
        body = label_studio.call("POST", f"/api/ml/{ml}/interactive-annotating",
                                 json={"task": task_id, "context": _prompt("the dog")})
        text = _message(body["data"]["result"])
        assert "the dog" in text and "missing.png" in text
    finally:
        stack.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retrieve_predictions_on_5000_tasks(label_studio, redis_url, tmp_path):
    """Label Studio's own action on a 5,000-task project: one /predict with every task; the backend
    hands it to the bulk path and the workers write exactly one prediction per task."""
    images = tmp_path / "images"
    images.mkdir()
    for n in range(20):  # tiny images, a few distinct ones (the result cache answers repeats)
        (images / f"i{n}.png").write_bytes(images_factory.make_png(24 + n, 16))
    stack = Stack(label_studio, redis_url, tmp_path, EGM_LOCAL_FILES_ROOT=str(images), EGM_BULK_BATCH_SIZE="250",
                  EGM_MAX_REQUEST_BYTES=str(1024 * 1024)).start()
    try:
        project = label_studio.create_project(CONFIG)
        task_ids = label_studio.import_tasks(project, [{"image": f"i{n % 20}.png"} for n in range(5000)])
        assert len(task_ids) == 5000
        label_studio.connect_ml_backend(project, stack.url)
        version = stack.model_version()
        # Label Studio needs a while to build the 2.5 MB request under load; then the answer is immediate
        resp = label_studio.admin.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                                       json={"selectedItems": {"all": True, "excluded": []}}, timeout=600)
        assert resp.status_code == 200, resp.text

        def predictions() -> list[dict]:
            return label_studio.call("GET", "/api/predictions/", params={"project": project})

        _wait(lambda: len(predictions()) >= 5000, timeout_s=600, what="5,000 predictions")
        time.sleep(1.0)  # nothing more arrives
        preds = predictions()
        per_task = collections.Counter(p["task"] for p in preds)
        assert set(per_task) == set(task_ids) and set(per_task.values()) == {1}
        assert {p["model_version"] for p in preds} == {version}
        assert all(_rects(p["result"]) for p in preds)
        log = (tmp_path / "backend.log").read_text()
        handed = [json.loads(line) for line in log.splitlines() if "predict handed to the bulk path" in line]
        assert handed and handed[0]["tasks"] == 5000
    finally:
        stack.stop()
