"""The ML backend's HTTP API against a real Redis and a real worker process."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from egm.backend.app import create_app
from egm import processes
from tests.stack import BOXES_CONFIG, SAMPLES, running_worker, sample_images, spawn_worker, version_of, wait_ready

AUTH = ("labelstudio", "s3cret-pass-9")


def _headers(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_PREDICT_BUDGET_S", "30")
    from egm.config.settings import reload_settings

    return reload_settings()


@pytest.fixture()
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture()
def worker(settings, tmp_path):
    with running_worker(settings, tmp_path / "worker.log") as proc:
        yield proc


def _tasks(n=None):
    return [{"id": i + 1, "data": {"image": str(p)}} for i, p in enumerate(sample_images()[:n])]


def test_health_and_setup_report_the_live_workers_model_version(client, worker, settings):
    health = client.get("/health").json()
    assert health["status"] == "UP" and health["workers"] == 1
    # the version the worker computed from what it serves, not one the backend made up
    assert health["model_version"] == version_of(settings=settings) and health["model_version"].startswith("scripted-")
    setup = client.post("/setup", json={"project": "1.1700000000", "schema": BOXES_CONFIG})
    assert setup.status_code == 200 and setup.json()["model_version"] == health["model_version"]


def test_without_a_worker_setup_and_predict_say_so_and_health_stays_up(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert health.json()["model_version"] is None and health.json()["workers"] == 0
    assert "egm-assist worker" in health.json()["detail"]
    setup = client.post("/setup", json={"project": "1.1700000000", "schema": BOXES_CONFIG})
    assert setup.status_code == 503
    assert setup.json()["detail"].startswith("no worker is serving a model: start one with `egm-assist worker`")
    resp = client.post("/predict", json={"tasks": _tasks(1), "project": "3.1", "label_config": BOXES_CONFIG})
    assert resp.status_code == 503 and "egm-assist worker" in resp.json()["detail"]
    assert not list(client.app.state.queue.redis.scan_iter("rq:job:*"))  # nothing was queued for nobody


def test_model_version_changes_with_prompt_or_decoding(settings, monkeypatch, tmp_path):
    from egm.config.settings import reload_settings
    from egm.worker.engines import create_engine

    def version() -> str:
        s = reload_settings()
        return version_of(create_engine(s, "scripted"), s)

    base = version()
    monkeypatch.setenv("EGM_MAX_NEW_TOKENS", "77")
    assert version() != base
    monkeypatch.delenv("EGM_MAX_NEW_TOKENS")
    (tmp_path / "referring.txt").write_text("Find {expression} and give its bbox as JSON")
    monkeypatch.setenv("EGM_PROMPT_DIR", str(tmp_path))
    assert version() != base
    monkeypatch.delenv("EGM_PROMPT_DIR")
    monkeypatch.setenv("EGM_UNCERTAINTY", "samples")
    monkeypatch.setenv("EGM_UNCERTAINTY_SAMPLES", "3")
    assert version() != base
    monkeypatch.delenv("EGM_UNCERTAINTY")
    monkeypatch.delenv("EGM_UNCERTAINTY_SAMPLES")
    assert version() == base


def test_a_backend_with_other_prompts_than_the_workers_refuses_to_plan(settings, worker, monkeypatch, tmp_path):
    from egm.config.settings import reload_settings

    (tmp_path / "multi.txt").write_text("Find all {categories} and give their boxes as JSON")
    monkeypatch.setenv("EGM_PROMPT_DIR", str(tmp_path))
    with TestClient(create_app(reload_settings())) as c:
        resp = c.post("/predict", json={"tasks": _tasks(1), "project": "3.1", "label_config": BOXES_CONFIG})
    assert resp.status_code == 503
    assert "other prompts" in resp.json()["detail"] and "EGM_PROMPT_DIR" in resp.json()["detail"]


def test_predict_returns_one_result_per_task_in_order(client, worker):
    tasks = _tasks()
    tasks.insert(1, {"id": 99, "data": {"text": "no image here"}})  # rejected up front, others unaffected
    resp = client.post("/predict", json={"tasks": tasks, "project": "3.1700000000", "label_config": BOXES_CONFIG,
                                         "params": {"context": None}})
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert len(results) == len(tasks)
    assert results[1] == []
    version = client.get("/health").json()["model_version"]
    for r in results[:1] + results[2:]:
        assert r["model_version"] == version
        rects = [i for i in r["result"] if i["type"] == "rectanglelabels"]
        assert rects and all(i["value"]["rectanglelabels"][0] in {"circle", "square"} for i in rects)
        assert all(0 <= i["value"]["x"] <= 100 and 0 <= i["value"]["y"] <= 100 for i in rects)


def test_interactive_prompt_returns_boxes(client, worker):
    context = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["the red circle"]}}]}
    config = BOXES_CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')
    resp = client.post("/predict", json={"tasks": _tasks(1), "project": "3.1", "label_config": config,
                                         "params": {"context": context}})
    assert resp.status_code == 200
    result = resp.json()["results"][0]["result"]
    texts = [i for i in result if i["type"] == "textarea"]
    assert any("the red circle" in t["value"]["text"][0] for t in texts)  # the scripted engine echoes the prompt


def test_late_results_are_handed_to_the_worker(settings, monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("EGM_PREDICT_BUDGET_S", "0.2")
    from egm.config.settings import reload_settings

    s = reload_settings()
    proc = spawn_worker(s, tmp_path / "w.log", EGM_SCRIPTED_DELAY_S="2")  # slower than the budget
    try:
        wait_ready(s, 60, proc)
        with TestClient(create_app(s)) as c:
            resp = c.post("/predict", json={"tasks": _tasks(2), "project": "3.1", "label_config": BOXES_CONFIG})
            assert resp.json()["results"] == [[], []]  # nothing yet: no duplicate prediction later
            queue = c.app.state.queue
            handoffs = list(queue.redis.scan_iter(queue.keys.handoff("*")))
            assert len(handoffs) == 1
            job_id = handoffs[0].decode().rsplit(":", 1)[-1]
            deadline = time.monotonic() + 60
            while queue.result(job_id) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert queue.redis.get(queue.keys.deliver(job_id)) == b"worker"
            assert [r.status for r in queue.result(job_id).results] == ["ok", "ok"]
    finally:
        processes.stop(proc)


@pytest.mark.parametrize("body,needle", [
    ({}, "tasks"),
    ({"tasks": []}, "tasks"),
    ({"tasks": [{"id": 1}]}, "data"),
    ({"tasks": [{"id": 1, "data": {"image": "x.jpg"}}], "label_config": "<View><Image name='i' value='$image'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>"},
     "RectangleLabels"),
    ({"tasks": [{"id": 1, "data": {"image": "x.jpg"}}], "label_config": "<View><oops"}, "config"),
    ({"tasks": [{"id": 1, "data": {"image": "x.jpg"}}]}, "label_config"),
    ({"tasks": [{"id": 1, "data": {"image": "x.jpg"}}], "label_config": BOXES_CONFIG, "project": "abc"}, "project"),
])
def test_bad_predict_requests_get_a_clear_4xx(client, body, needle):
    resp = client.post("/predict", json=body)
    assert resp.status_code == 422
    assert needle.lower() in resp.json()["detail"].lower()


def test_non_json_and_oversized_bodies(settings, monkeypatch):
    monkeypatch.setenv("EGM_MAX_PREDICT_BYTES", str(settings.max_request_bytes * 2))
    from egm.config.settings import reload_settings

    settings = reload_settings()
    with TestClient(create_app(settings)) as client:
        json_headers = {"content-type": "application/json"}
        assert client.post("/predict", content=b"{not json", headers=json_headers).status_code == 422
        # /predict has its own, larger limit (Retrieve predictions sends every selected task at once)
        over_general = b"x" * (settings.max_request_bytes + 1)
        assert client.post("/predict", content=over_general, headers=json_headers).status_code == 422
        assert client.post("/setup", content=over_general, headers=json_headers).status_code == 413
        huge = client.post("/predict", content=b"x" * (settings.max_predict_bytes + 1), headers=json_headers)
        assert huge.status_code == 413 and "EGM_MAX_PREDICT_BYTES" in huge.json()["detail"]


def test_enormous_prompt_is_refused(client):
    context = {"result": [{"type": "textarea", "from_name": "prompt", "value": {"text": ["a" * 5000]}}]}
    config = BOXES_CONFIG.replace("</View>", '<TextArea name="prompt" toName="image"/></View>')
    resp = client.post("/predict", json={"tasks": _tasks(1), "label_config": config, "params": {"context": context}})
    assert resp.status_code == 422 and "prompt" in resp.json()["detail"]


def test_redis_down_is_a_503_not_a_traceback(settings, monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{processes.free_port()}/0")
    from egm.config.settings import reload_settings

    with TestClient(create_app(reload_settings())) as c:
        resp = c.post("/predict", json={"tasks": _tasks(1), "label_config": BOXES_CONFIG})
    assert resp.status_code == 503 and "Redis" in resp.json()["detail"]
    assert "Traceback" not in resp.text


@pytest.fixture()
def auth_client(settings, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", AUTH[0])
    monkeypatch.setenv("BASIC_AUTH_PASS", AUTH[1])
    from egm.config.settings import reload_settings

    with TestClient(create_app(reload_settings())) as c:
        yield c


ROUTES = [("post", "/setup", {"project": "1.1", "schema": BOXES_CONFIG}),
          ("post", "/predict", {"tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": BOXES_CONFIG}),
          ("post", "/webhook", {"action": "ANNOTATION_CREATED"}),
          ("get", "/metrics", None)]


@pytest.mark.parametrize("method,path,body", ROUTES)
@pytest.mark.parametrize("creds", [None, ("labelstudio", "wrong"), ("intruder", AUTH[1])])
def test_every_route_but_health_requires_basic_auth(auth_client, method, path, body, creds):
    headers = _headers(*creds) if creds else {}
    resp = getattr(auth_client, method)(path, headers=headers, **({"json": body} if body is not None else {}))
    assert resp.status_code == 401
    assert AUTH[1] not in resp.text


def test_right_credentials_and_open_health(auth_client):
    assert auth_client.get("/health").status_code == 200
    ok = auth_client.post("/setup", json={"project": "1.1"}, headers=_headers(*AUTH))
    assert ok.status_code == 503 and "no worker" in ok.json()["detail"]  # past the auth: no worker runs here
    assert auth_client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=_headers(*AUTH)).status_code == 201


def test_metrics_are_prometheus_text_and_move_when_jobs_run(client, worker):
    from prometheus_client.parser import text_string_to_metric_families

    def sample(text, name, **labels):
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    before = client.get("/metrics").text
    assert client.post("/predict", json={"tasks": _tasks(2), "label_config": BOXES_CONFIG}).status_code == 200
    # the worker counts a batch before it stores the result that answers /predict (worker/rq_entry.py _finish)
    after = client.get("/metrics").text
    assert sample(after, "egm_tasks_total", status="ok") == sample(before, "egm_tasks_total", status="ok") + 2
    assert sample(after, "egm_jobs_total") >= 1
    assert sample(after, "egm_end_to_end_seconds_count") >= 1
    assert sample(after, "egm_workers") == 1
