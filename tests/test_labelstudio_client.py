"""egm.labelstudio against a real Label Studio (tests/fixtures/labelstudio.py).

Every test that uses the ``label_studio`` fixture (directly or through ``client``/``project``)
carries the ``labelstudio`` mark, added by the fixture plugin.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from egm.labelstudio.config import parse_labeling_config
from egm.labelstudio import KeyKind, LabelStudioClient, LabelStudioError, key_kind
from egm.labelstudio.client import WEBHOOK_ACTIONS

TEMPLATES = Path(__file__).resolve().parents[1] / "config" / "labeling"
BOXES = (TEMPLATES / "boxes.xml").read_text()
MODEL_VERSION = "egm-test-1"


def png_bytes(width: int = 64, height: int = 48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def box(label: str = "Car", x: float = 10.0) -> list[dict]:
    return [{"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "original_width": 64, "original_height": 48, "image_rotation": 0,
             "value": {"x": x, "y": 10.0, "width": 20.0, "height": 30.0, "rotation": 0, "rectanglelabels": [label]}}]


def fake_jwt(claims: dict) -> str:
    def part(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.fixture(scope="module")
def client(label_studio) -> LabelStudioClient:
    with label_studio.client(backoff_s=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def project(label_studio):
    """A boxes.xml project: one uploaded PNG, one local-files PNG and 30 URL tasks."""
    pid = label_studio.create_project(BOXES)
    png = png_bytes()
    upload_task, upload_url = label_studio.upload_image(pid, png, "red.png")
    local_png = png_bytes(32, 32, (10, 200, 10))
    local_url = label_studio.add_local_files(pid, {"green.png": local_png})["green.png"]
    local_task = label_studio.import_tasks(pid, [{"image": local_url}])[0]
    url_tasks = label_studio.import_tasks(pid, [{"image": f"http://images.invalid/{i}.jpg"} for i in range(30)])
    return {"id": pid, "png": png, "upload_task": upload_task, "upload_url": upload_url,
            "local_png": local_png, "local_url": local_url, "local_task": local_task, "url_tasks": url_tasks}


# --------------------------------------------------------------------------- projects and tasks


@pytest.mark.parametrize("template", ["boxes.xml", "boxes_prompt.xml", "boxes_reasoning.xml"])
def test_templates_are_accepted_by_label_studio(label_studio, client, template):
    xml = (TEMPLATES / template).read_text()
    pid = label_studio.create_project(xml)
    stored = client.get_label_config(pid)
    assert parse_labeling_config(stored) == parse_labeling_config(xml)


def test_get_project(client, project):
    info = client.get_project(project["id"])
    assert info.id == project["id"]
    assert "RectangleLabels" in info.label_config


def test_iter_tasks_pages_through_every_task(client, project):
    tasks = list(client.iter_tasks(project["id"], page_size=7))
    ids = [t.id for t in tasks]
    assert ids == sorted(ids)
    assert set(ids) == {project["upload_task"], project["local_task"], *project["url_tasks"]}
    by_id = {t.id: t for t in tasks}
    assert by_id[project["upload_task"]].data["image"] == project["upload_url"]
    assert by_id[project["local_task"]].data["image"] == project["local_url"]


def test_batched_predictions_give_exactly_one_per_task(label_studio, client, project):
    predictions = [{"task": t, "result": box(), "score": 0.5 + i / 100, "model_version": MODEL_VERSION}
                   for i, t in enumerate(project["url_tasks"])]
    report = client.create_predictions(project["id"], predictions, chunk_size=8)
    assert report.created == 30 and report.failed == []

    stored = client.list_predictions(project_id=project["id"])
    per_task = {}
    for p in stored:
        per_task.setdefault(p.task, []).append(p)
    assert sorted(per_task) == sorted(project["url_tasks"])
    assert all(len(v) == 1 and v[0].model_version == MODEL_VERSION for v in per_task.values())
    assert per_task[project["url_tasks"][3]][0].score == pytest.approx(0.53)
    assert per_task[project["url_tasks"][0]][0].result[0]["value"]["rectanglelabels"] == ["Car"]

    listed = {t.id: t for t in client.iter_tasks(project["id"], page_size=10)}
    assert listed[project["url_tasks"][0]].model_versions == [MODEL_VERSION]
    assert listed[project["url_tasks"][0]].total_predictions == 1
    assert listed[project["upload_task"]].model_versions == []


def test_bad_predictions_are_reported_and_do_not_sink_the_batch(label_studio, client):
    pid = label_studio.create_project(BOXES)
    tasks = label_studio.import_tasks(pid, [{"image": f"http://images.invalid/{i}.jpg"} for i in range(4)])
    predictions = [{"task": t, "result": box(), "score": 0.9, "model_version": "v-bad"} for t in tasks]
    predictions.insert(1, {"task": 10_000_000, "result": box(), "model_version": "v-bad"})  # not in project
    predictions.insert(3, {"task": "seven", "result": box()})  # malformed
    report = client.create_predictions(pid, predictions, chunk_size=100)
    assert report.created == 4
    assert sorted(f.index for f in report.failed) == [1, 3]
    assert sorted(p.task for p in client.list_predictions(project_id=pid)) == sorted(tasks)


def test_single_prediction_roundtrip(label_studio, client):
    pid = label_studio.create_project(BOXES)
    (task,) = label_studio.import_tasks(pid, [{"image": "http://images.invalid/one.jpg"}])
    created = client.create_prediction(task, box("Dog", x=5), score=0.25, model_version="single-1")
    assert (created.task, created.model_version, created.score) == (task, "single-1", 0.25)
    assert [p.id for p in client.list_predictions(task_id=task)] == [created.id]
    client.delete_prediction(created.id)
    assert client.list_predictions(task_id=task) == []


def test_project_version_prediction_by_id_and_annotation_are_client_methods(label_studio, client):
    """The calls other modules made raw (PATCH model_version, GET one prediction, POST an annotation)."""
    pid = label_studio.create_project(BOXES)
    (task,) = label_studio.import_tasks(pid, [{"image": "http://images.invalid/one.jpg"}])
    created = client.create_prediction(task, box("Dog", x=5), score=0.5, model_version="shown-1")
    client.set_project_model_version(pid, "shown-1")  # Label Studio accepts versions it has predictions of
    assert client.get_project(pid).model_version == "shown-1"
    fetched = client.get_prediction(created.id)
    assert (fetched.id, fetched.task, fetched.model_version, fetched.result) == (created.id, task, "shown-1",
                                                                                 created.result)
    client.create_annotation(task, box("Dog", x=6), lead_time_s=3.0, parent_prediction=created.id)
    (exported,) = client.export_annotations(pid)
    (annotation,) = exported.annotations
    assert annotation.parent_prediction == created.id and annotation.lead_time == 3.0


def test_iteration_with_a_no_predictions_filter_survives_concurrent_writes(label_studio, client):
    """Writing predictions while iterating "tasks without predictions" must not skip tasks."""
    pid = label_studio.create_project(BOXES)
    tasks = label_studio.import_tasks(pid, [{"image": f"http://images.invalid/{i}.jpg"} for i in range(12)])
    no_predictions = {"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]}
    seen = []
    for task in client.iter_tasks(pid, filters=no_predictions, page_size=3):
        seen.append(task.id)
        client.create_prediction(task.id, box(), model_version="loop-1")
    assert seen == tasks
    assert list(client.iter_tasks(pid, filters=no_predictions)) == []


def test_create_view_and_iterate_it(label_studio, client):
    pid = label_studio.create_project(BOXES)
    tasks = label_studio.import_tasks(pid, [{"image": f"http://images.invalid/{i}.jpg"} for i in range(5)])
    client.create_predictions(pid, [{"task": t, "result": box(), "model_version": "view-1"} for t in tasks[:2]])
    view = client.create_view(pid, "needs pre-annotation", filters={"conjunction": "and", "items": [
        {"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]})
    assert view.title == "needs pre-annotation"
    assert [t.id for t in client.iter_tasks(pid, view_id=view.id, page_size=2)] == tasks[2:]
    other = label_studio.create_project(BOXES)
    with pytest.raises(LabelStudioError, match="does not belong"):
        list(client.iter_tasks(other, view_id=view.id))


# --------------------------------------------------------------------------- files and tokens


def test_download_uploaded_and_local_files_with_legacy_token(client, project):
    assert client.key_kind is KeyKind.legacy
    assert client.download(project["upload_url"]) == project["png"]
    assert client.download(project["local_url"]) == project["local_png"]
    assert client.download(client.url + project["upload_url"]) == project["png"]


def test_download_enforces_the_size_limit(client, project):
    with pytest.raises(LabelStudioError, match="limit"):
        client.download(project["upload_url"], max_bytes=len(project["png"]) - 1)


def test_download_never_sends_the_token_elsewhere(client, label_studio):
    with pytest.raises(LabelStudioError, match="another host") as info:
        client.download("http://images.invalid/x.png")
    assert label_studio.token not in str(info.value)


def test_personal_access_token(label_studio, project):
    pat = label_studio.personal_access_token()
    assert key_kind(pat) is KeyKind.refresh
    with label_studio.client(pat) as c:
        assert c.key_kind is KeyKind.refresh
        assert c.get_project(project["id"]).id == project["id"]
        assert c.download(project["upload_url"]) == project["png"]
        assert c.download(project["local_url"]) == project["local_png"]
        assert c.sdk.projects.get(id=project["id"]).id == project["id"]


def test_personal_access_token_renews_its_access_token(label_studio, project):
    with label_studio.client(label_studio.personal_access_token()) as c:
        auth = c._auth
        c.get_project(project["id"])
        first = auth._access
        auth._access_exp = 0.0  # as if the 5-minute access token had run out
        c.get_project(project["id"])
        assert auth._access and auth._access != first
        # An access token Label Studio no longer accepts: one 401, a refresh, and the call goes through.
        auth._access, auth._access_exp = fake_jwt({"token_type": "access", "exp": 9_999_999_999}), float("inf")
        assert c.download(project["upload_url"]) == project["png"]
        assert auth._access.count(".") == 2 and auth._access_exp < float("inf")


def test_key_kind_detection():
    assert key_kind("0123456789abcdef0123456789abcdef01234567") is KeyKind.legacy
    assert key_kind(fake_jwt({"token_type": "refresh", "exp": 9_999_999_999})) is KeyKind.refresh
    assert key_kind(fake_jwt({"token_type": "access", "exp": 9_999_999_999})) is KeyKind.access
    assert key_kind("a.b.c") is KeyKind.legacy


# --------------------------------------------------------------------------- webhooks and export


def test_ml_backend_webhook_headers_are_patched_and_sent(label_studio, client, ml_backend_stub):
    pid = label_studio.create_project(BOXES)
    (task,) = label_studio.import_tasks(pid, [{"image": "http://images.invalid/w.jpg"}])
    label_studio.connect_ml_backend(pid, ml_backend_stub.url, is_interactive=True)
    assert ml_backend_stub.received("/setup"), "Label Studio did not call /setup"

    hooks = client.list_webhooks(pid)
    assert [h.url for h in hooks] == [ml_backend_stub.url + "/webhook"]
    auth = "Basic " + base64.b64encode(b"egm:hook-secret").decode()
    patched = client.patch_webhook_headers(hooks[0].id, {"Authorization": auth})
    assert patched.headers["Authorization"] == auth
    again = client.patch_webhook_headers(hooks[0].id, {"X-Extra": "1"})
    assert again.headers == {"Authorization": auth, "X-Extra": "1"}

    label_studio.create_annotation(task, box())
    calls = ml_backend_stub.wait_for("/webhook")
    assert calls, "Label Studio sent no webhook"
    assert calls[-1].headers.get("Authorization") == auth
    assert calls[-1].body["action"] == "ANNOTATION_CREATED"


def test_ensure_webhook_creates_keeps_patches_and_leaves_exactly_one(label_studio, client):
    pid = label_studio.create_project(BOXES)
    url = "http://backend.egm.internal:9090/webhook"
    hook, outcome = client.ensure_webhook(pid, url)
    assert outcome == "created" and hook.url == url and hook.is_active
    assert set(hook.actions) == set(WEBHOOK_ACTIONS) and not hook.send_for_all_actions
    again, outcome = client.ensure_webhook(pid, url + "/")
    assert (again.id, outcome) == (hook.id, "kept")
    # Label Studio and the backend creating at once: the duplicate goes, the oldest stays
    client.create_webhook(pid, url)
    auth = {"Authorization": "Basic " + base64.b64encode(b"egm:hook-secret").decode()}
    kept, outcome = client.ensure_webhook(pid, url, headers=auth)
    assert (kept.id, outcome, kept.headers) == (hook.id, "patched", auth)
    # the same receiver under another name counts as the same webhook
    client.create_webhook(pid, "http://10.1.2.3:9090/webhook", actions=None)
    kept, outcome = client.ensure_webhook(pid, url, headers=auth, same=lambda u: u.endswith(":9090/webhook"))
    assert (kept.id, outcome) == (hook.id, "kept")
    assert [(h.id, h.url) for h in client.list_webhooks(pid)] == [(hook.id, url)]


def test_ensure_webhook_keeps_the_one_label_studio_made_for_an_ml_backend(label_studio, client, ml_backend_stub):
    pid = label_studio.create_project(BOXES)
    label_studio.connect_ml_backend(pid, ml_backend_stub.url)
    (made,) = client.list_webhooks(pid)
    kept, outcome = client.ensure_webhook(pid, ml_backend_stub.url + "/webhook")
    assert (kept.id, outcome) == (made.id, "kept")
    assert len(client.list_webhooks(pid)) == 1


def test_export_carries_review_fields(label_studio, client):
    pid = label_studio.create_project(BOXES)
    done, skipped = label_studio.import_tasks(pid, [{"image": "http://images.invalid/a.jpg"},
                                                    {"image": "http://images.invalid/b.jpg"}])
    pred = client.create_prediction(done, box(), score=0.8, model_version="exp-1")
    label_studio.create_annotation(done, box("Person"), parent_prediction=pred.id, ground_truth=True,
                                   lead_time=3.5)
    label_studio.create_annotation(skipped, [], was_cancelled=True)
    exported = {t.id: t for t in client.export_annotations(pid, all_tasks=True)}
    accepted = exported[done].annotations[0]
    assert accepted.parent_prediction == pred.id
    assert accepted.ground_truth is True and accepted.was_cancelled is False
    assert accepted.result[0]["value"]["rectanglelabels"] == ["Person"]
    assert accepted.lead_time == pytest.approx(3.5)
    assert exported[skipped].annotations[0].was_cancelled is True


# --------------------------------------------------------------------------- errors


def test_http_errors_are_clear_and_secret_free(label_studio, client):
    with pytest.raises(LabelStudioError) as info:
        client.get_project(987654)
    assert info.value.status_code == 404
    assert "GET /api/projects/987654/" in str(info.value)
    assert label_studio.token not in str(info.value)


def test_rejected_legacy_token_is_not_echoed(label_studio):
    wrong = "f" * 40
    with label_studio.client(wrong, retries=0) as c, pytest.raises(LabelStudioError) as info:
        c.get_project(1)
    assert info.value.status_code == 401
    assert wrong not in str(info.value) and wrong not in repr(info.value.args)


def test_rejected_personal_access_token_is_not_echoed(label_studio):
    forged = fake_jwt({"token_type": "refresh", "exp": 9_999_999_999, "user_id": "1"})
    with label_studio.client(forged, retries=0) as c, pytest.raises(LabelStudioError) as info:
        c.get_project(1)
    assert info.value.status_code == 401
    assert "personal access token" in str(info.value)
    assert forged not in str(info.value)


def test_unreachable_server_error_names_the_url_not_the_token(label_studio):
    from egm.processes import free_port

    key = "0" * 40
    with LabelStudioClient(f"http://127.0.0.1:{free_port()}", key, retries=1, backoff_s=0.01) as c:
        with pytest.raises(LabelStudioError, match="cannot connect") as info:
            c.get_project(1)
    assert key not in str(info.value)


def test_from_settings(label_studio, monkeypatch):
    from egm.config.settings import reload_settings

    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url + "/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    try:
        with LabelStudioClient.from_settings(reload_settings()) as c:
            assert c.url == label_studio.url
            assert c.get_project(label_studio.create_project(BOXES)).title.startswith("egm test")
    finally:
        monkeypatch.undo()
        reload_settings()


# --------------------------------------------------------------------------- retries (no Label Studio needed)


class FlakyServer:
    """A real HTTP server that answers 503 to the first ``failures`` requests, then 200."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.calls.append((self.command, self.headers.get("Authorization", "")))
                status = 503 if len(server.calls) <= server.failures else 200
                data = json.dumps({"id": 1, "title": "t", "label_config": "<View/>", "detail": "busy"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def flaky():
    server = FlakyServer(failures=2)
    yield server
    server.close()


def test_idempotent_calls_are_retried_on_5xx(flaky):
    key = "a" * 40
    with LabelStudioClient(flaky.url, key, retries=3, backoff_s=0.01) as c:
        assert c.get_project(1).id == 1
    assert [m for m, _ in flaky.calls] == ["GET", "GET", "GET"]
    assert all(auth == f"Token {key}" for _, auth in flaky.calls)


def test_writes_are_not_retried_on_5xx(flaky):
    key = "b" * 40
    with LabelStudioClient(flaky.url, key, retries=3, backoff_s=0.01) as c:
        with pytest.raises(LabelStudioError) as info:
            c.create_prediction(1, box(), model_version="v")
    assert info.value.status_code == 503
    assert [m for m, _ in flaky.calls] == ["POST"]
    assert key not in str(info.value)


def test_retries_give_up_with_the_last_status(flaky):
    flaky.failures = 10
    with LabelStudioClient(flaky.url, "c" * 40, retries=2, backoff_s=0.01) as c:
        with pytest.raises(LabelStudioError, match="HTTP 503") as info:
            c.get_project(1)
    assert info.value.status_code == 503
    assert len(flaky.calls) == 3
