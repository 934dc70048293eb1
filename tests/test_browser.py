"""Label Studio as an annotator sees it: Chromium, driven by Playwright, against the real stack.

One Label Studio (the session's), one Redis, the real backend and the real queue worker with an
engine that answers like EGM about the bundled sample images (tests/browser_worker.py: known
boxes, per-shape reasoning, per-image scores; pre-annotation misses the circle of wide.jpg).
The browser logs in through the login page, then checks what issue 10 asks of the annotator's
side: the Data Manager's score column and sorting by it, the predicted boxes in the labeling
view, each region's own reasoning, a typed prompt (Shift+Enter) giving one suggestion with the
right label and no duplicate, and Submit with Auto-Annotation on adding no suggestion.

The browser is Debian's Chromium (``/usr/bin/chromium``, or ``EGM_TEST_CHROMIUM``); nothing is
downloaded. Without it (or without the ``playwright`` package) the tests FAIL, unless
``EGM_BROWSER_OPTIONAL=1`` is set (local machines without a browser): then they skip, saying why.
CI installs chromium (.ci/run) and does not set it. ``EGM_TEST_BROWSER_WAIT_S`` (default 90) is how
long one wait on the page may take (raise it on a loaded machine).

Every step saves a screenshot in a pytest tmp folder; with ``EGM_SCREENSHOTS_DIR`` set, also there
(the README's images come from such a run, 1280x800). Waits are on selectors and responses,
never on sleeps; the tests run in file order on one project.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from egm import processes
from tests.browser_worker import CONFIDENCE, IMAGES, MISSED, SAMPLES, TRUTH, WHERE

pytestmark = pytest.mark.labelstudio

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("EGM_TEST_CHROMIUM") or "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}
WAIT_MS = int(float(os.environ.get("EGM_TEST_BROWSER_WAIT_S") or 90) * 1000)
PROMPT = "the circle on the right"
#: the shipped side-panel config, with the sample images' shapes as labels (distinct colours)
CONFIG = (REPO / "config" / "labeling" / "boxes_reasoning.xml").read_text()
for _old, _new in [('value="Person" background="#e6194b" predicted_values="people,man,woman,child"',
                    'value="square" background="#4363d8"'),
                   ('value="Vehicle" background="#3cb44b" predicted_values="car,truck,bus,van,motorcycle"',
                    'value="circle" background="#e6194b"'),
                   ('value="Animal" background="#f58231" predicted_values="dog,cat,horse,bird"',
                    'value="triangle" background="#3cb44b"')]:
    assert _old in CONFIG, f"boxes_reasoning.xml changed: update the browser suite's label swap ({_old})"
    CONFIG = CONFIG.replace(_old, _new)

ROWS_JS = """() => [...document.querySelectorAll('[data-testid="table-row-wrapper"]')]
  .map(w => ({top: parseFloat(w.style.top), cells: [...w.querySelectorAll('.lsf-table__cell')].map(c => c.innerText.trim())}))
  .sort((a, b) => a.top - b.top).map(r => r.cells)"""
HEAD_JS = "() => [...document.querySelectorAll('.lsf-table-head span[data-id]')].map(e => e.dataset.id)"
RECTS_JS = """() => window.Htx.annotationStore.selected.regions.filter(r => r.type === 'rectangleregion')
  .map(r => ({label: (r.labels || []).join(','), x: r.x, y: r.y, width: r.width, height: r.height}))"""


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set EGM_TEST_CHROMIUM)"
    return None


def _browser_optional() -> bool:
    return os.environ.get("EGM_BROWSER_OPTIONAL", "").strip().lower() in ("1", "true", "yes")


def _need_browser() -> None:
    reason = _browser_missing()
    if reason is not None:
        pytest.fail(f"browser suite cannot run: {reason}; set EGM_BROWSER_OPTIONAL=1 to skip it on a machine "
                    f"without a browser", pytrace=False)


# skipping is decided before anything starts (no Label Studio for nothing); failing is the default
_MISSING = _browser_missing()
if _MISSING is not None and _browser_optional():
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"browser suite skipped (EGM_BROWSER_OPTIONAL=1): {_MISSING}")]


# --------------------------------------------------------------------------- the stack


class BrowserStack:
    """The real backend and the sample-shapes worker, wired to the session's Label Studio and Redis."""

    def __init__(self, label_studio, redis_server, tmp: Path) -> None:
        self.port = processes.free_port()
        self.env = {"REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/7", "EGM_QUEUE_PREFIX": f"br{self.port}",
                    "EGM_PORT": str(self.port), "LABEL_STUDIO_URL": label_studio.url,
                    "LABEL_STUDIO_API_KEY": label_studio.token, "EGM_HEARTBEAT_S": "1",
                    "EGM_LOCAL_FILES_ROOT": str(SAMPLES), "EGM_LOG_FORMAT": "json"}
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120) -> "BrowserStack":
        backend = processes.spawn(["serve"], self.env, self.tmp / "backend.log")
        self.procs.append(backend)
        with open(self.tmp / "worker.log", "wb") as log:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "tests.browser_worker"], cwd=REPO,
                                               env={**os.environ, **self.env}, stdout=log,
                                               stderr=subprocess.STDOUT))
        processes.wait_http(self.url + "/health", 60, backend)
        deadline = time.monotonic() + ready_timeout_s
        while httpx.get(self.url + "/health").json()["workers"] < 1:
            assert time.monotonic() < deadline, f"worker not ready; see {self.tmp / 'worker.log'}"
            assert all(p.poll() is None for p in self.procs), f"backend or worker exited; logs in {self.tmp}"
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for p in self.procs:
            processes.stop(p)


class Shots:
    """Screenshots of each step: a pytest tmp folder, and EGM_SCREENSHOTS_DIR when set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        extra = os.environ.get("EGM_SCREENSHOTS_DIR")
        self.extra = Path(extra) if extra else None

    def __call__(self, page, name: str) -> Path:
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path))
        if self.extra is not None:
            self.extra.mkdir(parents=True, exist_ok=True)
            (self.extra / path.name).write_bytes(path.read_bytes())
        return path


@pytest.fixture(scope="module")
def stack(label_studio, redis_server, tmp_path_factory):
    _need_browser()
    s = BrowserStack(label_studio, redis_server, tmp_path_factory.mktemp("browser-stack")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def project(label_studio, stack) -> dict:
    """A project on the side-panel config with the sample images as tasks (not connected yet)."""
    pid = label_studio.create_project(CONFIG, title="Shapes")
    tasks = {name: label_studio.upload_image(pid, SAMPLES / name)[0] for name in IMAGES}
    return {"id": pid, "tasks": tasks}


def _ml_backends(label_studio, project: dict) -> list[dict]:
    return label_studio.call("GET", "/api/ml/", params={"project": project["id"]})


def _predicted_tasks(label_studio, project: dict) -> set[int]:
    return {p["task"] for p in label_studio.list_predictions(project["id"])} & set(project["tasks"].values())


def _wait_for_predictions(label_studio, project: dict, stack) -> None:
    deadline = time.monotonic() + 120
    while len(_predicted_tasks(label_studio, project)) < len(project["tasks"]):
        assert time.monotonic() < deadline, f"predictions missing; backend and worker logs in {stack.tmp}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def predicted(label_studio, stack, project) -> dict:
    """The project connected (interactive) and every task pre-annotated. The first two tests do it
    through the UI; when they did not run (``-k``), the API does it here."""
    if not _ml_backends(label_studio, project):
        label_studio.connect_ml_backend(project["id"], stack.url, is_interactive=True, title="EGM")
    if len(_predicted_tasks(label_studio, project)) < len(project["tasks"]):
        label_studio.call("POST", "/api/dm/actions",
                          params={"id": "retrieve_tasks_predictions", "project": project["id"]},
                          json={"selectedItems": {"all": True, "excluded": []}})
        _wait_for_predictions(label_studio, project, stack)
    return project


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Shots:
    return Shots(tmp_path_factory.mktemp("browser-screenshots"))


@pytest.fixture(scope="module")
def page(label_studio, stack, shots):
    """A Chromium page logged in through Label Studio's login page."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport=VIEWPORT)
        context.route(re.compile(r"https?://(?!127\.0\.0\.1)"), lambda route: route.abort())  # no outside calls
        context.set_default_timeout(WAIT_MS)
        pg = context.new_page()
        pg.goto(label_studio.url + "/user/login/")
        pg.fill('input[name="email"]', label_studio.username)
        pg.fill('input[name="password"]', label_studio.password)
        shots(pg, "00-login")
        pg.click('button[type="submit"]')
        pg.wait_for_url(lambda url: "/user/login" not in url)
        pg.wait_for_load_state()
        whoami = context.request.get(label_studio.url + "/api/current-user/whoami")  # the session cookie works
        assert whoami.ok and whoami.json()["email"] == label_studio.username, whoami.text()
        yield pg
        context.close()
        browser.close()


def _open_task(page, label_studio, project: dict, image: str) -> None:
    page.goto(f"{label_studio.url}/projects/{project['id']}/data?task={project['tasks'][image]}")
    try:
        page.locator(".lsf-outliner-item").first.wait_for()
        page.wait_for_function("() => window.Htx && window.Htx.annotationStore.selected")
    except Exception:
        page.screenshot(path=str(Path(os.environ.get("EGM_SCREENSHOTS_DIR") or "/tmp") / f"failed-open-{image}.png"))
        raise


def _outliner_labels(page) -> list[str]:
    return sorted(page.locator(".lsf-outliner-item .lsf-outliner-item__title").all_inner_texts())


def _truth_percent(name: str) -> dict[str, tuple[float, float, float, float]]:
    info = TRUTH[name]
    return {o["label"]: (o["pixels"][0] * 100 / info["width"], o["pixels"][1] * 100 / info["height"],
                         (o["pixels"][2] - o["pixels"][0]) * 100 / info["width"],
                         (o["pixels"][3] - o["pixels"][1]) * 100 / info["height"]) for o in info["objects"]}


def _rectangles(result: list[dict]) -> list[dict]:
    return [r for r in result if isinstance(r, dict) and r.get("type") == "rectanglelabels"]


def _answer_result(body) -> list[dict]:
    """The result items of Label Studio's interactive-annotating answer (``{"data": {"result": [...]}}``;
    an empty answer comes back as an empty list)."""
    data = body.get("data", body) if isinstance(body, dict) else body
    if isinstance(data, dict):
        data = data.get("result", [])
    return data if isinstance(data, list) else []


# --------------------------------------------------------------------------- the annotator's steps


def test_connect_the_backend_in_settings_model(page, label_studio, stack, project, shots):
    """Settings -> Model -> Connect Model: name, backend URL, Interactive preannotations on."""
    page.goto(f"{label_studio.url}/projects/{project['id']}/settings/ml")
    page.get_by_text("Connect Model", exact=True).first.click()
    form = page.locator("form", has=page.locator('input[name="url"]'))
    form.locator('input[name="title"]').fill("EGM")
    form.locator('input[name="url"]').fill(stack.url)
    form.get_by_text("Interactive preannotations").click()
    assert form.locator('input[name="is_interactive"]').is_checked()
    shots(page, "01-connect-model")
    with page.expect_response(lambda r: r.url.split("?")[0].rstrip("/").endswith("/api/ml")
                              and r.request.method == "POST") as created:
        form.locator('button[type="submit"]').click()  # "Validate and Save": Label Studio calls /health, /setup
    assert created.value.status == 201, created.value.text()
    page.get_by_text(stack.url, exact=True).wait_for()  # the model's card
    backends = _ml_backends(label_studio, project)
    assert len(backends) == 1 and backends[0]["url"] == stack.url and backends[0]["is_interactive"]
    shots(page, "02-model-connected")


def test_retrieve_predictions_from_the_data_manager(page, label_studio, stack, project, shots):
    """Select all tasks -> "N Tasks" -> Retrieve Predictions: one prediction per task."""
    if not _ml_backends(label_studio, project):
        pytest.skip("the backend is not connected (the settings test did not run)")
    page.goto(f"{label_studio.url}/projects/{project['id']}/data")
    page.locator('[data-testid="table-row-wrapper"]').first.wait_for()
    page.locator('.lsf-table-head input[type="checkbox"]').first.check()
    page.locator("button", has_text=re.compile(r"^\s*\d+ Tasks?\s*$")).click()
    page.get_by_text("Retrieve Predictions", exact=True).wait_for()
    shots(page, "03-retrieve-predictions")
    page.get_by_text("Retrieve Predictions", exact=True).click()
    with page.expect_response(lambda r: "/api/dm/actions" in r.url and r.request.method == "POST"):
        page.locator('[data-testid="dialog-ok-button"]').click()  # Label Studio asks to confirm ("OK")
    _wait_for_predictions(label_studio, project, stack)
    page.reload()
    page.wait_for_function(f"""() => {{ const rows = ({ROWS_JS})();
        return rows.length === {len(project["tasks"])}; }}""")
    assert len(label_studio.list_predictions(project["id"])) == len(project["tasks"])  # one per task


def test_score_column_shows_the_scores_and_sorting_by_it_reorders_the_tasks(page, label_studio, predicted, shots):
    project = predicted
    page.goto(f"{label_studio.url}/projects/{project['id']}/data")
    page.get_by_role("button", name="Columns").wait_for()
    page.locator('[data-testid="table-row-wrapper"]').first.wait_for()
    if not page.locator('span[data-id="tasks:predictions_score"]').count():
        page.get_by_role("button", name="Columns").click()
        page.locator(".lsf-menu-dm__item label", has_text="Prediction score").click()
        page.get_by_role("button", name="Columns").click()  # close the menu
        page.locator(".lsf-menu-dm__item label", has_text="Prediction score").wait_for(state="hidden")
    page.locator('span[data-id="tasks:predictions_score"]').wait_for()
    column = 1 + page.evaluate(HEAD_JS).index("tasks:predictions_score")  # cell 0 is the row's checkbox
    expected = {project["tasks"][name]: CONFIDENCE[name] for name in IMAGES}
    # the column fills in with every task's score (Label Studio averages the project's model_version's predictions)
    page.wait_for_function(f"""() => {{ const rows = ({ROWS_JS})();
        return rows.length === {len(expected)} && rows.every(r => r[{column}] !== ''); }}""")
    rows = page.evaluate(ROWS_JS)
    shown = {int(r[1]): float(r[column]) for r in rows}
    assert shown == pytest.approx(expected, abs=1e-3)
    before = [int(r[1]) for r in rows]
    shots(page, "04-data-manager-scores")

    page.get_by_role("button", name="Order by").click()
    with page.expect_response(lambda r: "/api/tasks" in r.url and r.request.method == "GET"):
        page.locator(".lsf-menu-dm__item:not(:has(label))", has_text="Prediction score").click()
    by_score = sorted(expected, key=expected.get)  # least confident first: what to review first
    page.wait_for_function(f"() => ({ROWS_JS})().map(r => Number(r[1])).join() === '{','.join(map(str, by_score))}'")
    after = [int(r[1]) for r in page.evaluate(ROWS_JS)]
    assert after == by_score and after != before
    page.get_by_role("button", name="Prediction score").click()  # close the menu (the button shows the order now)
    page.locator(".lsf-menu-dm__item:not(:has(label))", has_text="Prediction score").wait_for(state="hidden")
    shots(page, "05-data-manager-sorted-by-score")


def test_the_labeling_view_draws_the_predicted_boxes(page, label_studio, predicted, shots):
    project = predicted
    _open_task(page, label_studio, project, "shapes.jpg")
    page.locator("canvas").first.wait_for()
    truth = _truth_percent("shapes.jpg")
    assert _outliner_labels(page) == sorted(truth)
    drawn = {r["label"]: (r["x"], r["y"], r["width"], r["height"]) for r in page.evaluate(RECTS_JS)}
    assert set(drawn) == set(truth)
    for label, box in truth.items():
        assert drawn[label] == pytest.approx(box, abs=0.5), label  # where the shape is, in percent
    # the image-level reasoning is shown once, in the task-level text area of the side panel
    image_text = page.locator('[name^="image_reasoning:"][data-testid="htx-textbox-content"]')
    assert image_text.count() == 1 and "I look at the shapes" in image_text.inner_text()
    shots(page, "06-labeling-predicted-boxes")


def test_selecting_a_region_shows_that_regions_own_reasoning(page, label_studio, predicted, shots):
    project = predicted
    _open_task(page, label_studio, project, "shapes.jpg")
    region_text = page.locator('[name^="reasoning:"][data-testid="htx-textbox-content"]')
    for label, other in [("square", "circle"), ("circle", "square")]:
        page.locator(".lsf-outliner-item", has_text=label).click()
        region_text.first.wait_for()
        page.wait_for_function(f"""() => [...document.querySelectorAll('[name^="reasoning:"]')]
            .some(e => e.innerText.includes('{WHERE[label]}'))""")
        texts = region_text.all_inner_texts()
        assert len(texts) == 1, texts  # only the selected region's text is shown
        assert f"The {label} {WHERE[label]}" in texts[0]
        assert other not in texts[0] and WHERE[other] not in texts[0]
        shots(page, f"07-region-reasoning-{label}")
    page.keyboard.press("Escape")


def test_a_typed_prompt_gives_one_suggestion_with_its_label_and_no_duplicate(page, label_studio, predicted, shots):
    project = predicted
    name = "wide.jpg"  # pre-annotated with the triangle only: the circle was missed
    _open_task(page, label_studio, project, name)
    assert _outliner_labels(page) == sorted(set(_truth_percent(name)) - {MISSED[name]})
    toggle = page.locator('[data-testid="bottombar-auto-annotation-toggle"]')
    if not toggle.is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    assert toggle.is_checked()
    prompt = page.locator('textarea[name="prompt"]')
    prompt.fill(PROMPT)
    with page.expect_response(lambda r: "/interactive-annotating" in r.url) as answer:
        prompt.press("Shift+Enter")
    assert answer.value.ok, answer.value.text()
    suggested = _rectangles(_answer_result(answer.value.json()))
    # the model boxed the circle AND the triangle again: only the circle comes back, labelled circle
    assert [r["value"]["rectanglelabels"] for r in suggested] == [[MISSED[name]]]
    page.locator(".lsf-auto-accept__info").filter(has_text=re.compile(r"^1 suggestions?$")).wait_for()
    shots(page, "08-prompt-suggestion")
    page.locator('[data-testid="bottombar-accept-suggestions-button"]').click()
    page.locator(".lsf-outliner-item", has_text=MISSED[name]).wait_for()
    assert _outliner_labels(page) == sorted(_truth_percent(name))  # triangle + circle, nothing twice
    drawn = {r["label"]: (r["x"], r["y"], r["width"], r["height"]) for r in page.evaluate(RECTS_JS)}
    assert drawn[MISSED[name]] == pytest.approx(_truth_percent(name)[MISSED[name]], abs=0.5)
    # the accepted box carries the prompt's reasoning as its own
    page.locator(".lsf-outliner-item", has_text=MISSED[name]).click()
    page.wait_for_function("""() => [...document.querySelectorAll('[name^="reasoning:"]')]
        .some(e => e.innerText.includes('where the annotator pointed'))""")
    assert PROMPT in page.locator('[name^="reasoning:"][data-testid="htx-textbox-content"]').inner_text().lower()
    shots(page, "09-prompt-accepted")


def test_submit_with_auto_annotation_on_adds_no_suggestion(page, label_studio, predicted, shots):
    project = predicted
    name = "tall.jpg"
    _open_task(page, label_studio, project, name)
    before = _outliner_labels(page)
    toggle = page.locator('[data-testid="bottombar-auto-annotation-toggle"]')
    if not toggle.is_checked():
        page.get_by_text("Auto-Annotation", exact=True).click()
    assert toggle.is_checked()
    # Label Studio follows a Submit with an interactive call carrying `context: {"result": []}`
    with page.expect_response(lambda r: "/interactive-annotating" in r.url) as answer:
        with page.expect_response(lambda r: re.search(r"/api/tasks/\d+/annotations", r.url)
                                  and r.request.method == "POST") as saved:
            # the side panel's resize handle can lie over the bottom bar's edge at some widths and
            # swallow a pointer click there: press the button itself, as its own click handler sees it
            page.get_by_role("button", name="Submit").dispatch_event("click")
    assert saved.value.status == 201
    assert answer.value.ok and _rectangles(_answer_result(answer.value.json())) == []
    page.get_by_text("Annotation saved successfully", exact=True).wait_for()
    assert page.locator(".lsf-auto-accept__info").filter(has_text=re.compile(r"[1-9]\d* suggestion")).count() == 0
    assert _outliner_labels(page) == before
    shots(page, "10-submitted-no-suggestion")
    annotations = label_studio.call("GET", f"/api/tasks/{project['tasks'][name]}/annotations/")
    assert len(annotations) == 1 and sorted(r["value"]["rectanglelabels"][0] for r in
                                            _rectangles(annotations[0]["result"])) == before
