"""Security end to end: credentials on every route, SSRF attempts through the worker, no secret in logs.

The URL guard's unit tests (tests/test_url_guard.py) check the policy address by address;
here the attempts travel as task image URLs through the backend and a real worker, and an
"internal" HTTP server records whether anything reached it.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from egm.backend.app import create_app
from egm import processes
from egm.contract import BatchResult
from egm.queue import QueueClient
from tests import images_factory as f
from tests.fault_stack import Procs, wait_until
from tests.image_server import ImageServer, Route
from tests.secrets_scan import assert_no_secrets, find_secrets
from tests.stack import BOXES_CONFIG, SAMPLES, batch_job, sample_images, spawn_worker, wait_ready

OPEN_ROUTES = {"/", "/health"}
USER = "ls-backend"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --------------------------------------------------------------------------- authentication


@pytest.fixture()
def password():
    return "pw-" + secrets.token_urlsafe(12)


@pytest.fixture()
def auth_app(egm_env, monkeypatch, password):
    monkeypatch.setenv("BASIC_AUTH_USER", USER)
    monkeypatch.setenv("BASIC_AUTH_PASS", password)
    from egm.config.settings import reload_settings

    return create_app(reload_settings())


def _routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, so a route added later is covered without editing this test."""
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in OPEN_ROUTES:
            out.extend((m, route.path) for m in sorted(route.methods - {"HEAD", "OPTIONS"}))
    return out


BAD_HEADERS = {
    "none": None,
    "wrong password": lambda pw: _basic(USER, pw + "x"),
    "wrong user": lambda pw: _basic("admin", pw),
    "empty password": lambda pw: _basic(USER, ""),
    "password prefix": lambda pw: _basic(USER, pw[:-1]),
    "no colon": lambda pw: "Basic " + base64.b64encode(USER.encode()).decode(),
    "not base64": lambda pw: "Basic !!!not-base64!!!",
    "bearer": lambda pw: f"Bearer {pw}",
    "token scheme": lambda pw: f"Token {pw}",
    "raw password": lambda pw: pw,
    "non-ascii": lambda pw: "Basic " + base64.b64encode(f"{USER}:{pw}é".encode()).decode(),
}


@pytest.mark.parametrize("header", list(BAD_HEADERS))
def test_every_route_refuses_missing_and_wrong_credentials(auth_app, password, header):
    routes = _routes(auth_app)
    assert {("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"), ("GET", "/metrics")} <= set(routes)
    make = BAD_HEADERS[header]
    headers = {"Authorization": make(password)} if make else {}
    with TestClient(auth_app, raise_server_exceptions=False) as client:
        for method, path in routes:
            resp = client.request(method, path.replace("{", "").replace("}", ""), headers=headers, json={})
            assert resp.status_code == 401, (method, path, resp.status_code, resp.text[:200])
            assert resp.headers.get("www-authenticate", "").startswith("Basic")
            assert password not in resp.text


def test_right_credentials_pass_on_every_route(auth_app, password):
    with TestClient(auth_app) as client:
        for method, path in _routes(auth_app):
            resp = client.request(method, path, headers={"Authorization": _basic(USER, password)}, json={})
            assert resp.status_code != 401, (method, path)
        assert client.get("/health").status_code == 200


# --------------------------------------------------------------------------- SSRF through the worker


@pytest.fixture()
def internal():
    """A server that must never be reached (stands for Redis, an admin page, the metadata service)."""
    with ImageServer({"/secret.png": Route(200, f.make_png(8, 8), {"Content-Type": "image/png"})}) as srv:
        yield srv


@pytest.fixture()
def settings(egm_env, monkeypatch):
    monkeypatch.setenv("EGM_LOCAL_FILES_ROOT", str(SAMPLES))
    monkeypatch.setenv("EGM_PREDICT_BUDGET_S", "60")
    monkeypatch.setenv("EGM_BATCH_SIZE", "64")
    from egm.config.settings import reload_settings

    return reload_settings()


def _run_through_worker(settings, tmp_path, images: list[str], **worker_env) -> tuple[list, dict]:
    """One /predict call with these images (a good sample first); returns the answers and stored results."""
    images = [str(sample_images()[0]), *images]
    proc = spawn_worker(settings, tmp_path / "worker.log", **worker_env)
    try:
        wait_ready(settings, 60, proc)
        with TestClient(create_app(settings)) as client:
            tasks = [{"id": i + 1, "data": {"image": img}} for i, img in enumerate(images)]
            resp = client.post("/predict", json={"tasks": tasks, "label_config": BOXES_CONFIG})
            assert resp.status_code == 200
            queue = client.app.state.queue
            stored = {}
            for key in queue.redis.scan_iter(queue.keys.result("*")):
                for r in BatchResult.model_validate_json(queue.redis.get(key)).results:
                    stored[r.task_id] = r
    finally:
        processes.stop(proc)
    results = resp.json()["results"]
    assert results[0] and stored[1].status == "ok"  # the good task next to the attacks is unaffected
    return results, stored


def _loopback_spellings(port: int) -> dict[str, str]:
    return {
        "127.0.0.1": f"http://127.0.0.1:{port}/secret.png",
        "localhost": f"http://localhost:{port}/secret.png",
        "LOCALHOST.": f"http://LOCALHOST.:{port}/secret.png",
        "[::1]": f"http://[::1]:{port}/secret.png",
        "IPv4-mapped IPv6": f"http://[::ffff:127.0.0.1]:{port}/secret.png",
        "IPv4-mapped IPv6 hex": f"http://[::ffff:7f00:1]:{port}/secret.png",
        "decimal": f"http://2130706433:{port}/secret.png",
        "hex": f"http://0x7f000001:{port}/secret.png",
        "octal": f"http://0177.0.0.1:{port}/secret.png",
        "short": f"http://127.1:{port}/secret.png",
        "0.0.0.0": f"http://0.0.0.0:{port}/secret.png",
        "userinfo trick": f"http://images.example.com@127.0.0.1:{port}/secret.png",
        "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "metadata decimal": "http://2852039166/latest/meta-data/",
        "file scheme": "file:///etc/passwd",
        "gopher": f"gopher://127.0.0.1:{port}/_INFO",
    }


def test_loopback_and_metadata_urls_are_refused_by_a_worker(settings, tmp_path, internal):
    """Any public host allowed (EGM_ALLOWED_HOSTS=*), private networks not: every internal spelling fails."""
    attacks = _loopback_spellings(internal.port)
    results, stored = _run_through_worker(settings, tmp_path, list(attacks.values()), EGM_ALLOWED_HOSTS="*")
    assert results[1:] == [[]] * len(attacks)
    for i, name in enumerate(attacks, 2):
        r = stored[i]
        assert r.status == "failed" and r.error_kind == "image:blocked", (name, r.error_kind, r.error)
    assert internal.requests == []  # nothing reached the internal server


def test_redirects_to_internal_addresses_are_refused(settings, tmp_path, internal):
    """An allowed image host answers with redirects into the internal network; no hop gets through."""
    port = internal.port
    targets = {
        "other loopback port": f"http://127.0.0.1:{port}/secret.png",
        "localhost": f"http://localhost:{port}/secret.png",
        "[::1]": f"http://[::1]:{port}/secret.png",
        "decimal": f"http://2130706433:{port}/secret.png",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "file": "file:///etc/passwd",
        "relative to internal via //": f"//127.0.0.1:{port}/secret.png",
    }
    routes = {f"/r{i}": Route(302, headers={"Location": t}) for i, t in enumerate(targets.values())}
    routes["/chain"] = Route(301, headers={"Location": "/r0"})  # a redirect chain ending inside
    with ImageServer(routes) as front:
        urls = [front.url(p) for p in routes]
        # the front host (and private networks, since it is on loopback) is allowed; the internal one is not
        results, stored = _run_through_worker(settings, tmp_path, urls, EGM_ALLOWED_HOSTS=f"127.0.0.1:{front.port}",
                                              EGM_ALLOW_PRIVATE_NETWORKS="true")
        assert len(front.requests) >= len(routes)  # the first hops were made ...
    assert results[1:] == [[]] * len(routes)
    for i in range(2, len(routes) + 2):
        assert stored[i].error_kind == "image:blocked", stored[i].error
    assert internal.requests == []  # ... and none of the redirects was followed inside


def test_dns_names_that_resolve_inside_are_refused(settings, monkeypatch, internal):
    """Names added to the resolver (the worker's DNS seam): private, loopback, metadata, mixed answers."""
    import egm.images.url_guard as url_guard
    from egm.worker.batch_worker import run_worker
    from egm.worker.engines.scripted import ScriptedEngine

    table = {"intranet.example.test": ["10.1.2.3"], "loop.example.test": ["127.0.0.1"],
             "meta.example.test": ["169.254.169.254"], "mixed.example.test": ["93.184.216.34", "127.0.0.1"],
             "v6loop.example.test": ["::1"], "mapped.example.test": ["::ffff:10.0.0.1"]}

    real = url_guard._system_resolver

    def resolver(host: str, port: int) -> list[str]:
        return table[host] if host in table else real(host, port)

    monkeypatch.setattr(url_guard, "_system_resolver", resolver)
    monkeypatch.setenv("EGM_ALLOWED_HOSTS", "*")
    from egm.config.settings import reload_settings

    s = reload_settings()
    queue = QueueClient(s)
    names = [*table, "localhost"]
    job = batch_job([sample_images()[0]])
    job.tasks += [job.tasks[0].model_copy(update={"task_id": i + 2, "image": f"http://{n}:{internal.port}/secret.png"})
                  for i, n in enumerate(names)]
    queue.enqueue(job)
    assert run_worker(s, engine=ScriptedEngine(), burst=True)
    results = queue.result(job.job_id).results
    assert results[0].status == "ok"
    for name, r in zip(names, results[1:]):
        assert r.status == "failed" and r.error_kind == "image:blocked", (name, r.error)
        assert name in r.error  # says which name resolved where
    assert internal.requests == []


# --------------------------------------------------------------------------- no secret in any log


class EchoServer:
    """A hostile 'Label Studio': answers every call with an error whose body echoes the request headers."""

    def __init__(self, status: int) -> None:
        status_code = status

        class Handler(BaseHTTPRequestHandler):
            def _echo(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({"detail": "denied", "you_sent": dict(self.headers.items())}).encode()
                self.send_response(status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = _echo

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def redis_with_password(tmp_path):
    password = "redis-" + secrets.token_hex(10)
    port = processes.free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    wait_until(lambda: processes.redis_reachable(url), 10, "redis-server with a password")
    yield url, password
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("ls_status", [401, 500])
def test_no_secret_in_any_log_line(tmp_path, redis_with_password, ls_status):
    """Backend and worker run with known secrets, meet wrong credentials, hostile servers and
    secret-bearing URLs; then every log line is scanned for every secret (and its encodings)."""
    redis_url, redis_pw = redis_with_password
    basic_pw, ls_key, openai_key, url_token = ("basic-" + secrets.token_hex(8), secrets.token_hex(20),
                                               "sk-" + secrets.token_hex(16), "tok-" + secrets.token_hex(8))
    echo = EchoServer(ls_status)
    try:
        p = Procs.create(redis_url, "sec", tmp_path, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=basic_pw,
                         LABEL_STUDIO_URL=echo.url, LABEL_STUDIO_API_KEY=ls_key, EGM_OPENAI_API_KEY=openai_key,
                         EGM_PREDICT_BUDGET_S="1", EGM_SCRIPTED_DELAY_S="1.5", EGM_LS_OUTAGE_WAIT_S="2",
                         EGM_LOG_LEVEL="DEBUG",
                         EGM_ALLOWED_HOSTS="*")
        p.backend()
        p.worker("w1")
        p.wait_ready()
        auth = (USER, basic_pw)
        images = [str(sample_images()[0]),  # ok; its late result is written to the hostile "Label Studio"
                  f"{echo.url}/data/upload/1/a.png?token={url_token}",  # Label Studio media: downloaded with the key
                  f"http://user:{url_token}@127.0.0.1:9/a.png",  # credentials in the URL, blocked
                  f"http://images.example.invalid/a.png?access_token={url_token}&sig={url_token}"]
        body = {"tasks": [{"id": i + 1, "data": {"image": img}} for i, img in enumerate(images)],
                "project": "5.1700000000", "label_config": BOXES_CONFIG}
        assert p.predict(body, auth=auth).status_code == 200
        assert p.predict(body, auth=(USER, basic_pw + "x")).status_code == 401
        assert p.predict(body, headers={"Authorization": f"Bearer {ls_key}"}).status_code == 401
        assert httpx.post(p.backend_url + "/setup", json={"project": "5.1", "schema": BOXES_CONFIG,
                                                          "access_token": ls_key}, auth=auth).status_code in (200, 422)
        assert httpx.post(p.backend_url + "/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 5}},
                          auth=auth).status_code == 201
        # the late result must be attempted (and refused by the hostile server) before we read the logs
        wait_until(lambda: "predictions not written to Label Studio" in p.log_text("w1"), 60,
                   "the worker's refused write")
    finally:
        echo.close()
        if "p" in locals():
            p.stop_all()
    files = assert_no_secrets(tmp_path, [basic_pw, ls_key, openai_key, url_token, redis_pw], users=[USER],
                              min_files=2)
    assert sum(len(f.read_text().splitlines()) for f in files) > 10  # the processes did log


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The helper itself: a planted secret, its basic-auth encoding and a raw header are all found."""
    (tmp_path / "a.log").write_text('{"msg": "ok"}\n{"msg": "key sEcReT-123456 leaked"}\n')
    (tmp_path / "b.log").write_text(f'{{"hdr": "{_basic(USER, "sEcReT-123456")}"}}\n'
                                    '{"msg": "Authorization: Token abcdef012345"}\n'
                                    '{"msg": "Authorization: Token ***"}\n')
    found = find_secrets(tmp_path, ["sEcReT-123456"], users=[USER])
    assert [(x.path.name, x.line_no) for x in found] == [("a.log", 2), ("b.log", 1), ("b.log", 2)]
    assert all("sEcReT-123456" not in str(x) for x in found)  # the report masks what it found
