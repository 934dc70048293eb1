"""End to end with a real Label Studio 1.23: connect the backend, retrieve predictions, interactive prompts.

Label Studio -> our backend (subprocess) -> Redis -> worker (subprocess) -> back to Label Studio.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from egm import processes
from tests.stack import SAMPLES, sample_images

pytestmark = pytest.mark.labelstudio

CONFIG = (Path(__file__).resolve().parent.parent / "config" / "labeling" / "boxes_reasoning.xml").read_text()


def _labels(config: str) -> set[str]:
    from egm.labelstudio.config import parse_labeling_config

    return set(parse_labeling_config(config).target.labels)


class Stack:
    """Backend + worker processes wired to one Label Studio and one Redis."""

    def __init__(self, label_studio, redis_url: str, tmp: Path, **env: str) -> None:
        self.port = processes.free_port()
        self.env = {"REDIS_URL": redis_url, "EGM_QUEUE_PREFIX": f"e2e{self.port}", "EGM_PORT": str(self.port),
                    "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
                    "EGM_ENGINE": "scripted", "EGM_HEARTBEAT_S": "1", "EGM_LOCAL_FILES_ROOT": str(SAMPLES), **env}
        self.tmp = tmp
        self.procs = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int = 1, ready_timeout_s: float = 120) -> "Stack":
        """Backend and workers up, and the workers ready: Label Studio's /setup on connect needs a live version."""
        backend = processes.spawn(["serve"], self.env, self.tmp / "backend.log")
        self.procs.append(backend)
        for i in range(workers):
            self.procs.append(processes.spawn(["worker", "--name", f"w{i}-{self.port}"], self.env,
                                              self.tmp / f"worker{i}.log"))
        processes.wait_http(self.url + "/health", 60, backend)
        deadline = time.monotonic() + ready_timeout_s
        while httpx.get(self.url + "/health").json()["workers"] < workers:
            assert time.monotonic() < deadline, f"workers not ready: {httpx.get(self.url + '/health').json()}"
            assert all(p.poll() is None for p in self.procs), "a worker or the backend exited; see its log"
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for p in self.procs:
            processes.stop(p)

    def model_version(self) -> str:
        return httpx.get(self.url + "/health").json()["model_version"]


@pytest.fixture()
def stack(label_studio, redis_url, tmp_path):
    s = Stack(label_studio, redis_url, tmp_path).start()
    yield s
    s.stop()


def _wait_for_predictions(label_studio, project_id: int, n: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.time() + timeout_s
    preds = []
    while time.time() < deadline:
        preds = label_studio.list_predictions(project_id)
        if len(preds) >= n:
            return preds
        time.sleep(0.3)
    return preds


def test_retrieve_predictions_gives_one_prediction_per_task(label_studio, stack):
    project = label_studio.create_project(CONFIG)
    task_ids = [label_studio.upload_image(project, p)[0] for p in sample_images()]
    label_studio.connect_ml_backend(project, stack.url)
    label_studio._call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                       json={"selectedItems": {"all": True, "excluded": []}})
    preds = _wait_for_predictions(label_studio, project, len(task_ids))
    assert sorted(p["task"] for p in preds) == sorted(task_ids)  # exactly one per task
    version = stack.model_version()
    labels = _labels(CONFIG)
    for p in preds:
        assert p["model_version"] == version
        rects = [r for r in p["result"] if r["type"] == "rectanglelabels"]
        assert rects
        for r in rects:
            v = r["value"]
            assert set(v["rectanglelabels"]) <= labels
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100
            assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
        # each box carries its own reasoning (same region id); the whole text comes once, without a region
        reasoning = [r for r in p["result"] if r["type"] == "textarea" and r["from_name"] == "reasoning"]
        assert {r["id"] for r in reasoning} == {r["id"] for r in rects}
        whole = [r for r in p["result"] if r["type"] == "textarea" and r["from_name"] == "image_reasoning"]
        assert len(whole) == 1 and "x" not in whole[0]["value"]
    # asking again computes nothing new: Label Studio skips tasks that have this model_version
    label_studio._call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                       json={"selectedItems": {"all": True, "excluded": []}})
    time.sleep(1.0)
    assert len(label_studio.list_predictions(project)) == len(task_ids)


def test_interactive_prompt_returns_boxes(label_studio, stack):
    project = label_studio.create_project(CONFIG)
    task_id, _ = label_studio.upload_image(project, sample_images()[0])
    ml = label_studio.connect_ml_backend(project, stack.url, is_interactive=True)
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                           "value": {"text": ["the red car"]}}]}
    body = label_studio._call("POST", f"/api/ml/{ml}/interactive-annotating",
                              json={"task": task_id, "context": context})
    result = body["data"]["result"]
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    assert len(rects) == 1 and rects[0]["value"]["rectanglelabels"] == ["Vehicle"]  # car: a Vehicle alias
    assert any("the red car" in r["value"]["text"][0] for r in result if r["type"] == "textarea")


def test_late_results_are_written_by_the_worker_without_duplicates(label_studio, redis_url, tmp_path):
    """A budget shorter than the work: /predict answers empty, the worker writes the predictions itself."""
    s = Stack(label_studio, redis_url, tmp_path, EGM_PREDICT_BUDGET_S="0.05",
              EGM_SCRIPTED_DELAY_S="0.5").start()
    try:
        project = label_studio.create_project(CONFIG)
        task_ids = [label_studio.upload_image(project, p)[0] for p in sample_images()[:2]]
        label_studio.connect_ml_backend(project, s.url)
        label_studio._call("POST", "/api/dm/actions",
                           params={"id": "retrieve_tasks_predictions", "project": project},
                           json={"selectedItems": {"all": True, "excluded": []}})
        preds = _wait_for_predictions(label_studio, project, len(task_ids))
        time.sleep(1.0)
        preds = label_studio.list_predictions(project)
        assert sorted(p["task"] for p in preds) == sorted(task_ids)
        assert {p["model_version"] for p in preds} == {s.model_version()}
    finally:
        s.stop()


def test_basic_auth_backend_patches_its_webhook_and_receives_events(label_studio, redis_url, tmp_path):
    user, password = "ls-backend", "pw-" + "x7Kq2mZp"
    s = Stack(label_studio, redis_url, tmp_path, BASIC_AUTH_USER=user, BASIC_AUTH_PASS=password).start()
    try:
        project = label_studio.create_project(CONFIG)
        task_id, _ = label_studio.upload_image(project, sample_images()[1])
        label_studio._call("POST", "/api/ml/", json={
            "url": s.url, "project": project, "title": "egm", "auth_method": "BASIC_AUTH",
            "basic_auth_user": user, "basic_auth_pass": password})
        client = label_studio.client()
        deadline = time.time() + 30
        hooks = []
        while time.time() < deadline:
            hooks = [h for h in client.list_webhooks(project) if h.url.endswith("/webhook")]
            if hooks and hooks[0].headers.get("Authorization", "").startswith("Basic "):
                break
            time.sleep(0.5)
        assert hooks and hooks[0].headers["Authorization"].startswith("Basic ")
        label_studio.create_annotation(task_id, [])
        auth = (user, password)
        deadline = time.time() + 20
        seen = 0.0
        while time.time() < deadline and not seen:
            text = httpx.get(s.url + "/metrics", auth=auth).text
            seen = sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("egm_annotation_events_total{"))
            time.sleep(0.3)
        assert seen >= 1  # Label Studio's webhook got through basic auth
        assert httpx.get(s.url + "/metrics").status_code == 401
        # no secret in the backend's or the worker's logs
        for log in tmp_path.glob("*.log"):
            text = log.read_text()
            assert password not in text and label_studio.token not in text, log.name
    finally:
        s.stop()


def test_backend_creates_the_webhook_label_studio_refuses_and_events_arrive_once(label_studio, redis_url, tmp_path):
    """Connected under a host name without a dot (like compose's `backend`), Label Studio makes no
    webhook; the backend creates one to EGM_PUBLIC_URL on /setup, once, and events reach it."""
    host = socket.gethostname()
    try:
        loopback = socket.gethostbyname(host) == "127.0.0.1"
    except OSError:
        loopback = False
    if "." in host or not loopback:
        pytest.skip(f"needs a dotless host name that resolves to 127.0.0.1 (this one: {host})")
    s = Stack(label_studio, redis_url, tmp_path)
    s.env["EGM_PUBLIC_URL"] = s.url  # an IP: Label Studio accepts it
    s.start()
    try:
        project = label_studio.create_project(CONFIG)
        task_id, _ = label_studio.upload_image(project, sample_images()[0])
        label_studio.connect_ml_backend(project, f"http://{host}:{s.port}")
        client = label_studio.client()
        deadline = time.time() + 30
        while time.time() < deadline and not client.list_webhooks(project):
            time.sleep(0.5)
        time.sleep(2)  # every /setup Label Studio sent has settled: still one webhook
        assert [h.url for h in client.list_webhooks(project)] == [s.url + "/webhook"]
        label_studio.create_annotation(task_id, [])
        deadline = time.time() + 20
        seen = 0.0
        while time.time() < deadline and not seen:
            text = httpx.get(s.url + "/metrics").text
            seen = sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith('egm_annotation_events_total{action="ANNOTATION_CREATED"'))
            time.sleep(0.3)
        time.sleep(1)
        text = httpx.get(s.url + "/metrics").text
        assert sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('egm_annotation_events_total{action="ANNOTATION_CREATED"')) == 1
    finally:
        s.stop()


SHAPES_CONFIG = CONFIG.replace(
    '<Label value="Vehicle" background="#3cb44b" predicted_values="car,truck,bus,van,motorcycle"/>',
    '<Label value="Shape" background="#3cb44b" predicted_values="circle,square,triangle"/>')


def test_tiny_model_through_the_real_transformers_engine(label_studio, redis_url, tmp_path, tiny_model_dir):
    """No scripted answers: the worker runs the tiny Qwen3-VL with transformers on the CPU."""
    s = Stack(label_studio, redis_url, tmp_path, EGM_ENGINE="hf", MODEL_DIR=str(tiny_model_dir), EGM_DEVICE="cpu",
              EGM_MAX_NEW_TOKENS="128", EGM_MAX_PIXELS=str(300 * 1024), HF_HUB_OFFLINE="1").start()
    try:
        project = label_studio.create_project(SHAPES_CONFIG)
        task_ids = [label_studio.upload_image(project, p)[0] for p in sample_images()[:2]]
        ml = label_studio.connect_ml_backend(project, s.url, is_interactive=True)
        # label-driven pre-annotation: the model's "circle" maps onto Shape through predicted_values
        label_studio._call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                           json={"selectedItems": {"all": True, "excluded": []}})
        preds = _wait_for_predictions(label_studio, project, len(task_ids), timeout_s=120)
        assert sorted(p["task"] for p in preds) == sorted(task_ids)
        for p in preds:
            rects = [r for r in p["result"] if r["type"] == "rectanglelabels"]
            assert [r["value"]["rectanglelabels"] for r in rects] == [["Shape"]]
            v = rects[0]["value"]  # the taught answer: [250, 200, 750, 800] on the 0-1000 grid
            assert (round(v["x"], 3), round(v["y"], 3), round(v["width"], 3), round(v["height"], 3)) == \
                (25.0, 20.0, 50.0, 60.0)
            assert 0 < p["score"] <= 1  # from the coordinate tokens' log-probabilities
        # interactive: a typed prompt goes through the same engine (on a task without that box yet:
        # a suggestion that repeats an existing prediction is not made)
        fresh_task = task_ids[0]
        for p in label_studio.list_predictions(project):
            if p["task"] == fresh_task:
                label_studio.call("DELETE", f"/api/predictions/{p['id']}/")
        context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                               "value": {"text": ["the round shape"]}}]}
        body = label_studio._call("POST", f"/api/ml/{ml}/interactive-annotating",
                                  json={"task": fresh_task, "context": context})
        rects = [r for r in body["data"]["result"] if r["type"] == "rectanglelabels"]
        assert len(rects) == 1 and rects[0]["value"]["rectanglelabels"] == ["Shape"]
    finally:
        s.stop()
