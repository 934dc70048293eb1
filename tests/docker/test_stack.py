"""The compose stack, built and run for real, driven end to end through Label Studio's API (issue 14).

Runs only with ``EGM_TEST_DOCKER=1`` (``make test-docker``): it needs root or a running Docker
daemon, Docker Compose 2.24.4+, and network access to a Debian mirror and PyPI for the image
builds. In order:

* ``docker/ensure-docker.sh`` starts a daemon if none answers; ``docker/standins/build.sh``
  provides the three base images (pulled, or stand-ins built with debootstrap when no registry
  answers) and a build-only stand-in for ``vllm/vllm-openai``;
* the GPU worker image is built (it cannot run here: building it proves its Dockerfile);
* the images of the no-GPU stack are built and ``docker compose up --wait`` brings up Label
  Studio, Redis, the backend and a scripted worker (``docker-compose.yml`` +
  ``docker/compose.no-gpu.yml`` + ``tests/docker/compose.test.yml``, which only adds a per-batch
  delay so a bulk run lasts long enough to restart things in its middle);
* through Label Studio: connect the backend, retrieve predictions (one per task, the backend's
  version), submit an annotation and see the webhook move ``/metrics`` (the backend creates the
  webhook when Label Studio cannot), scale to two workers, a bulk run in a one-off ``cli``
  container with ``restart redis`` and ``restart backend`` in its middle (nothing lost, nothing
  written twice), a ``--no-wait`` run that reads done and switches the project's version;
* ``docker compose down -v`` leaves no container or volume of the test project behind.

Each step's duration goes to ``out/test-docker/timings.json``, the stack's logs to
``out/test-docker/compose.log``. The test project name is
``EGM_TEST_DOCKER_PROJECT`` (default ``egm-test-stack``), so an operator's own stack is never touched.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from egm.processes import free_port
from egm.bulk.run_store import RunStore
from tests.fixtures.labelstudio import LabelStudioServer
from tests.images_factory import make_noise_jpeg

ENABLED = os.environ.get("EGM_TEST_DOCKER", "").strip() == "1"
pytestmark = [
    pytest.mark.docker,
    pytest.mark.timeout(int(os.environ.get("EGM_TEST_DOCKER_TIMEOUT_S", "5400"))),
    pytest.mark.skipif(not ENABLED, reason="the Docker stack test runs with EGM_TEST_DOCKER=1 (make test-docker)"),
]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROJECT = os.environ.get("EGM_TEST_DOCKER_PROJECT", "egm-test-stack")
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "docker" / "compose.no-gpu.yml", HERE / "compose.test.yml"]
OUT = ROOT / "out" / "test-docker"
BOXES = (ROOT / "config" / "labeling" / "boxes.xml").read_text()
PUBLIC_URL = "http://backend.egm.internal:9090"  # what docs/deployment.md tells users to connect
STANDIN_VLLM = "egm-standin/vllm-openai:v0.24.0"
#: scripted engine delay per batch, and the bulk run's size: long enough for two restarts inside it.
DELAY_S = float(os.environ.get("EGM_TEST_DOCKER_DELAY_S", "1.0"))
BULK_TASKS = int(os.environ.get("EGM_TEST_DOCKER_BULK_TASKS", "60"))
PREFIX = "egm"

TIMINGS: dict[str, float] = {}


def _record(step: str, started: float) -> None:
    TIMINGS[step] = round(time.monotonic() - started, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")


def sh(cmd: list[str], *, timeout_s: float, step: str | None = None, env: dict | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    if step:
        _record(step, started)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{tail}")
    return proc


@dataclass
class Stack:
    env_file: Path
    ls: LabelStudioServer
    backend_port: int
    redis_port: int
    projects: dict[str, int] = field(default_factory=dict)

    def compose_cmd(self, *args: str) -> list[str]:
        cmd = ["docker", "compose", "-p", PROJECT, "--env-file", str(self.env_file)]
        for f in COMPOSE_FILES:
            cmd += ["-f", str(f)]
        return cmd + list(args)

    def compose(self, *args: str, timeout_s: float = 600, step: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        return sh(self.compose_cmd(*args), timeout_s=timeout_s, step=step, check=check)

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"

    def health(self) -> dict:
        return httpx.get(self.backend_url + "/health", timeout=10).json()

    def version(self) -> str:
        version = self.health()["model_version"]
        assert version, "the backend reports no model_version"
        return version

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a /metrics series over the samples carrying ``labels``."""
        total = 0.0
        for line in httpx.get(self.backend_url + "/metrics", timeout=10).text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[-1])
        return total

    def runs(self) -> RunStore:
        return RunStore(redis.Redis(port=self.redis_port, socket_timeout=10), PREFIX)

    def predictions_by_task(self, project: int) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for p in self.ls.list_predictions(project):
            out.setdefault(int(p["task"]), []).append(p)
        return out

    def upload(self, project: int, n: int, seed: int) -> list[int]:
        """``n`` distinct images (distinct bytes: the result cache must not answer them) as tasks."""
        return [self.ls.upload_image(project, make_noise_jpeg(96, 96, seed=seed + i), f"img{seed + i}.jpg")[0]
                for i in range(n)]


def wait_for(what: str, check, timeout_s: float, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def docker_ready():
    sh(["sh", "docker/ensure-docker.sh"], timeout_s=180, step="ensure_docker")
    sh(["sh", "docker/standins/build.sh"], timeout_s=3600, step="base_images",
       env={"EGM_STANDINS_VLLM": "1"})


@pytest.fixture(scope="module")
def stack(docker_ready, tmp_path_factory):
    work = tmp_path_factory.mktemp("docker-stack")
    files = work / "files"
    files.mkdir()
    files.chmod(0o755)
    ls_port, backend_port, redis_port = free_port(), free_port(), free_port()
    ls = LabelStudioServer(binary=Path("/nonexistent"), port=ls_port, workdir=work)
    env_file = work / ".env"
    env_file.write_text("\n".join([
        f"LABEL_STUDIO_USERNAME={ls.username}", f"LABEL_STUDIO_PASSWORD={ls.password}",
        f"LABEL_STUDIO_USER_TOKEN={ls.token}", f"LABEL_STUDIO_PORT={ls_port}", f"BACKEND_PORT={backend_port}",
        f"REDIS_PORT={redis_port}", f"LOCAL_FILES_DIR={files}", f"EGM_SCRIPTED_DELAY_S={DELAY_S}", ""]))
    s = Stack(env_file=env_file, ls=ls, backend_port=backend_port, redis_port=redis_port)
    s.compose("down", "-v", "--remove-orphans", timeout_s=300)  # leftovers of an interrupted run
    try:
        s.compose("build", "backend", "worker", "cli", timeout_s=3600, step="build_stack_images")
        s.compose("up", "-d", "--wait", "--wait-timeout", "900", timeout_s=1200, step="compose_up")
        yield s
    finally:
        save_logs(s)
        s.compose("down", "-v", "--remove-orphans", timeout_s=600, check=False)


def save_logs(s: Stack) -> None:
    """The stack's logs, for whoever reads a failure (nothing is left once it is down)."""
    logs = s.compose("logs", "--no-color", "--timestamps", timeout_s=120, check=False)
    if logs.stdout.strip():
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "compose.log").write_text(logs.stdout + logs.stderr)


# --------------------------------------------------------------------------- tests, in order


def test_gpu_worker_image_builds(docker_ready):
    """docker/Dockerfile.worker builds without a registry beyond its base (here a build-only stand-in
    for vllm/vllm-openai: the project's steps, the constraints from the base's own packages, the
    entrypoint's mode and the non-root user are what this proves; CUDA is not)."""
    sh(["docker", "build", "-f", "docker/Dockerfile.worker", "--build-arg", f"VLLM_IMAGE={STANDIN_VLLM}",
        "-t", f"{PROJECT}-worker-gpu:test", "."], timeout_s=3600, step="build_gpu_worker_image",
       env={"DOCKER_BUILDKIT": "0"})
    inspect = json.loads(sh(["docker", "image", "inspect", f"{PROJECT}-worker-gpu:test"], timeout_s=60).stdout)[0]
    assert inspect["Config"]["User"] == "egm"
    assert inspect["Config"]["Entrypoint"] == ["/opt/egm/entrypoint.sh"]
    mode = sh(["docker", "run", "--rm", "--entrypoint", "stat", f"{PROJECT}-worker-gpu:test", "-c", "%a",
               "/opt/egm/entrypoint.sh"], timeout_s=120).stdout.strip()
    assert mode == "755"


def test_stack_comes_up_healthy_with_its_worker(stack):
    ps = [json.loads(line) for line in stack.compose("ps", "--format", "json", timeout_s=60).stdout.splitlines()
          if line.strip()]
    states = {c["Service"]: (c["State"], c.get("Health", "")) for c in ps}
    assert set(states) == {"label-studio", "redis", "backend", "worker"}, states
    assert all(state == "running" and health == "healthy" for state, health in states.values()), states
    health = stack.health()
    assert health["workers"] == 1 and health["model_version"], health


def test_label_studio_gets_one_prediction_per_task_of_the_backends_version(stack):
    ls = stack.ls
    project = ls.create_project(BOXES, title="connected under the documented URL")
    stack.projects["interactive"] = project
    tasks = stack.upload(project, 4, seed=0)
    ls.connect_ml_backend(project, PUBLIC_URL)
    ls.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}})
    by_task = wait_for("a prediction on every task", lambda: (
        (lambda b: b if set(b) == set(tasks) else None)(stack.predictions_by_task(project))), timeout_s=120)
    time.sleep(2)  # a second prediction per task, if any were coming, has arrived by now
    by_task = stack.predictions_by_task(project)
    assert sorted(by_task) == sorted(tasks)
    assert all(len(preds) == 1 for preds in by_task.values()), {t: len(p) for t, p in by_task.items()}
    assert {p[0]["model_version"] for p in by_task.values()} == {stack.version()}


def test_an_annotation_moves_the_correction_metrics_through_the_webhook(stack):
    ls, project = stack.ls, stack.projects["interactive"]
    client = ls.client()
    hooks = wait_for("the project's webhook", lambda: client.list_webhooks(project), timeout_s=60)
    assert [h.url for h in hooks] == [PUBLIC_URL + "/webhook"]
    version = stack.version()
    before = stack.metric("egm_correction_annotations_total", model_version=version)
    prediction = ls.list_predictions(project)[0]
    ls.create_annotation(prediction["task"], prediction["result"], parent_prediction=prediction["id"])
    wait_for("the annotation in /metrics", lambda: stack.metric(
        "egm_correction_annotations_total", model_version=version) == before + 1, timeout_s=60)
    assert stack.metric("egm_corrections_total", kind="accepted", model_version=version) >= 1


def test_the_backend_creates_the_webhook_label_studio_refuses_for_a_dotless_host(stack):
    """Connected as http://backend:9090, Label Studio makes no webhook ("Enter a valid URL."): the backend
    creates one under its dotted alias on /setup, once."""
    ls = stack.ls
    project = ls.create_project(BOXES, title="connected under the service name")
    (task,) = stack.upload(project, 1, seed=100)
    ls.connect_ml_backend(project, "http://backend:9090")
    client = ls.client()
    hooks = wait_for("the webhook the backend creates", lambda: client.list_webhooks(project), timeout_s=60)
    time.sleep(3)  # let every /setup Label Studio sent settle: still exactly one
    hooks = client.list_webhooks(project)
    assert [h.url for h in hooks] == [PUBLIC_URL + "/webhook"]
    before = stack.metric("egm_annotation_events_total", action="ANNOTATION_CREATED")
    ls.create_annotation(task, [])
    wait_for("the event in /metrics", lambda: stack.metric(
        "egm_annotation_events_total", action="ANNOTATION_CREATED") >= before + 1, timeout_s=60)


def test_two_workers_and_a_bulk_run_that_survives_redis_and_backend_restarts(stack):
    stack.compose("up", "-d", "--wait", "--wait-timeout", "600", "--scale", "worker=2", timeout_s=900,
                  step="scale_worker_2")
    wait_for("two ready workers", lambda: stack.health()["workers"] == 2, timeout_s=120)
    ls = stack.ls
    project = ls.create_project(BOXES, title="bulk")
    tasks = stack.upload(project, BULK_TASKS, seed=1000)
    version = stack.version()
    started = time.monotonic()
    run = subprocess.Popen(stack.compose_cmd("run", "--rm", "-T", "cli", "prelabel", "--project", str(project),
                                             "--batch-size", "2", "--json"),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        count = lambda: sum(len(p) for p in stack.predictions_by_task(project).values())  # noqa: E731
        at_redis = wait_for("the run to start writing", lambda: (lambda n: n if n >= 4 else 0)(count()),
                            timeout_s=300, poll_s=0.5)
        stack.compose("restart", "redis", timeout_s=300)
        at_backend = wait_for("progress after the Redis restart",
                              lambda: (lambda n: n if n >= at_redis + 4 else 0)(count()), timeout_s=300, poll_s=0.5)
        stack.compose("restart", "backend", timeout_s=300)
        out, err = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    _record("bulk_run_with_restarts", started)
    assert run.returncode == 0, err[-3000:]
    assert at_redis < BULK_TASKS and at_backend < BULK_TASKS, "both restarts must fall inside the run"
    summary = json.loads(out[out.index("{"):])
    progress = summary["progress"]
    assert (progress["state"], progress["total"], progress["failed"]) == ("done", BULK_TASKS, 0), progress
    by_task = stack.predictions_by_task(project)
    assert sorted(by_task) == sorted(tasks), "a task without a prediction"
    assert all(len(p) == 1 for p in by_task.values()), "a prediction written twice"
    assert {p[0]["model_version"] for p in by_task.values()} == {version}
    assert ls.call("GET", f"/api/projects/{project}/")["model_version"] == version


def test_a_no_wait_run_reads_done_and_switches_the_project_version(stack):
    ls = stack.ls
    project = ls.create_project(BOXES, title="no-wait")
    tasks = stack.upload(project, 6, seed=5000)
    version = stack.version()
    proc = stack.compose("run", "--rm", "-T", "cli", "prelabel", "--project", str(project), "--batch-size", "2",
                         "--no-wait", timeout_s=600)
    match = re.search(r"run (\S+): \d+ tasks", proc.stderr + proc.stdout)
    assert match, proc.stderr[-2000:]
    run_id = match.group(1)
    runs = stack.runs()
    progress = wait_for("the run to read done", lambda: (
        lambda p: p if p is not None and p.state == "done" else None)(runs.progress(run_id)), timeout_s=300)
    assert (progress.resolved, progress.failed) == (6, 0)
    by_task = stack.predictions_by_task(project)
    assert sorted(by_task) == sorted(tasks) and all(len(p) == 1 for p in by_task.values())
    wait_for("the project to show the run's version",
             lambda: ls.call("GET", f"/api/projects/{project}/")["model_version"] == version, timeout_s=30)
    status = stack.compose("run", "--rm", "-T", "cli", "status", run_id, timeout_s=600).stdout
    assert "[done]" in status


def test_down_v_removes_the_stack_and_its_volumes(stack):
    save_logs(stack)
    stack.compose("down", "-v", "--remove-orphans", timeout_s=600, step="compose_down")
    label = f"label=com.docker.compose.project={PROJECT}"
    assert sh(["docker", "ps", "-aq", "--filter", label], timeout_s=60).stdout.strip() == ""
    assert sh(["docker", "volume", "ls", "-q", "--filter", label], timeout_s=60).stdout.strip() == ""
