"""A newcomer's path (issue 15): every failure is one clear line within seconds, and the README is true.

Each case runs the real command (``python -m egm.cli``) as a subprocess against a real Redis (the
session's private server, or an unused port for "unreachable"). The subprocess timeout is only a
hang detector: a command that hangs fails the test instead of the suite; nothing asserts speed.
Each case checks the exit code (cli/errors.py's table), one ``error:`` line naming the cause on
stderr, and no traceback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from egm.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
#: hang detector for commands that must end by themselves (generous: the box is shared and loaded)
HANG_S = 120
SAMPLES = ROOT / "egm" / "samples"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABEL_STUDIO_", "EGM_", "MODEL_DIR", "REDIS_URL"))}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _cli(*argv: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egm.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          timeout=HANG_S, env=_env(**env))


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of stderr; no traceback, nothing else that looks like a failure."""
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    return errors[0]


def _unused_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in SAMPLES.glob("*.jpg"):
        shutil.copy(p, folder / p.name)
    return folder


# --------------------------------------------------------------------------- dead workers are noticed


def test_demo_with_a_model_dir_that_does_not_exist_ends_with_the_workers_reason(redis_url, tmp_path):
    out = _cli("demo", "--out", str(tmp_path / "demo"), MODEL_DIR="/nonexistent", EGM_ENGINE="hf",
               REDIS_URL=redis_url, EGM_WORKER_WAIT_S="600", EGM_WORKER_START_TIMEOUT_S="600")
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_error_line(out)
    assert "worker" in line and "MODEL_DIR /nonexistent does not exist" in line


def test_prelabel_local_worker_whose_model_cannot_load_ends_with_the_workers_reason(redis_url, images, tmp_path):
    # no MODEL_DIR: the worker asks the hub for nvidia/EGM-4B, which HF_HUB_OFFLINE makes fail at once
    out = _cli("prelabel", "--folder", str(images), "--labels", "circle", "--local-workers", "1",
               "--out", str(tmp_path / "out"), "--quiet", REDIS_URL=redis_url, EGM_ENGINE="hf",
               EGM_WORKER_WAIT_S="600", EGM_WORKER_START_TIMEOUT_S="600")
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_error_line(out)
    assert "exited" in line and "could not load the model from 'nvidia/EGM-4B'" in line
    assert ".." not in line.split("(log:")[0]


# --------------------------------------------------------------------------- one line, no traceback


def test_demo_with_a_missing_images_folder_is_one_line(tmp_path):
    out = _cli("demo", "--images", "/nonexistent", "--out", str(tmp_path / "demo"))
    assert out.returncode == 2
    assert "/nonexistent: no such folder" in _one_error_line(out)


def test_demo_with_an_empty_images_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _cli("demo", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "demo"))
    assert out.returncode == 2
    assert "no images in it" in _one_error_line(out)


def test_demo_with_an_unreachable_redis_url_is_one_line(tmp_path):
    out = _cli("demo", "--engine", "scripted", "--out", str(tmp_path / "demo"), REDIS_URL=_unused_redis())
    assert out.returncode == 1
    assert "cannot reach Redis" in _one_error_line(out)


def test_worker_checks_redis_before_it_loads_the_model():
    # MODEL_DIR does not exist: a worker that loaded the model first would fail on it, not on Redis
    url = _unused_redis()
    out = _cli("worker", REDIS_URL=url, MODEL_DIR="/nonexistent", EGM_ENGINE="hf")
    assert out.returncode == 1
    line = _one_error_line(out)
    assert f"cannot reach Redis at {url}" in line and "MODEL_DIR" not in out.stderr


def test_serve_without_redis_reports_down_on_health_naming_the_queue(tmp_path):
    port = free_port()
    url = _unused_redis()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "egm.cli", "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=_env(REDIS_URL=url), cwd=ROOT)
    try:
        deadline = time.monotonic() + HANG_S
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "serve never answered /health"
                time.sleep(0.2)
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "DOWN" and body["workers"] == 0 and body["model_version"] is None
        assert "queue unreachable" in body["detail"] and url in body["detail"]
        # what Label Studio's connection check and probes see: not UP
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _pids_with(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((line for line in (entry / "status").read_text().splitlines()
                              if line.startswith("State:")), "")
            except OSError:
                continue
            if text in cmdline and "zombie" not in state:
                pids.append(int(entry.name))
    return pids


def test_demo_killed_with_sigterm_stops_its_redis_backend_and_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "egm.cli", "demo", "--engine", "scripted", "--out",
                             str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(EGM_SCRIPTED_DELAY_S="600"), cwd=ROOT)
    lines = []
    try:
        deadline = time.monotonic() + HANG_S
        while not any(line.startswith("worker ready") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines) + proc.stderr.read()
            lines.append(proc.stdout.readline())
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        backend = re.search(r"backend up at (http://\S+);", "".join(lines)).group(1)
        worker_name = f"demo-{proc.pid}"
        assert _pids_with(worker_name), "the demo's worker is not running"
        time.sleep(1)  # /predict is waiting on the (slow) scripted engine now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err
    assert not _pids_with(worker_name), "the worker outlived the demo"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{backend}/health", timeout=2)
    import redis

    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=redis_port, socket_connect_timeout=1).ping()


def test_label_studio_down_is_one_line_not_retry_log_lines(redis_url, tmp_path):
    ls = f"http://127.0.0.1:{free_port()}"
    for argv in (["next", "--project", "1"], ["export", "--project", "1", "--out", str(tmp_path / "export")],
                 ["prelabel", "--project", "1", "--no-wait"]):
        out = _cli(*argv, "--ls-url", ls, "--ls-key", "0123456789abcdef0123456789abcdef01234567",
                   REDIS_URL=redis_url)
        assert out.returncode == 1, (argv, out.stderr)
        line = _one_error_line(out)
        assert "cannot connect to Label Studio" in line and ls in line, argv
        assert out.stderr.strip().count("\n") == 0, (argv, out.stderr)  # no log lines before it


# --------------------------------------------------------------------------- command-line consistency


def test_a_missing_label_studio_key_exits_2_with_the_same_advice_everywhere(redis_url, tmp_path):
    for argv in (["next", "--project", "1"], ["export", "--project", "1", "--out", str(tmp_path / "x")],
                 ["prelabel", "--project", "1"]):
        out = _cli(*argv, REDIS_URL=redis_url)
        assert out.returncode == 2, (argv, out.stderr)
        line = _one_error_line(out)
        assert "LABEL_STUDIO_API_KEY" in line and "--ls-key" in line, argv


@pytest.mark.parametrize("command", ["prelabel", "retry", "next", "export"])
def test_every_command_that_talks_to_label_studio_takes_ls_url_and_ls_key(command):
    out = _cli(command, "--help")
    assert out.returncode == 0
    assert "--ls-url" in out.stdout and "--ls-key" in out.stdout
    assert "--label-studio-url" not in out.stdout  # export's old name still works, unlisted


def test_exports_old_label_studio_url_option_still_works(redis_url, tmp_path):
    ls = f"http://127.0.0.1:{free_port()}"
    out = _cli("export", "--project", "1", "--out", str(tmp_path / "x"), "--label-studio-url", ls,
               "--ls-key", "0123456789abcdef0123456789abcdef01234567", REDIS_URL=redis_url)
    assert out.returncode == 1 and ls in _one_error_line(out)


def test_a_bad_flag_on_a_subcommand_shows_that_subcommands_usage():
    out = _cli("prelabel", "--folder", "x", "--no-such-flag")
    assert out.returncode == 2
    assert "usage: egm-assist prelabel" in out.stderr and "unrecognized arguments: --no-such-flag" in out.stderr
    out = _cli("status", "--bogus")
    assert out.returncode == 2 and "usage: egm-assist status" in out.stderr


def test_help_texts_have_no_backticks_or_notes_for_developers():
    from egm.cli.main import COMMANDS

    for command in ["", *(c.replace("_", "-") for c in COMMANDS)]:
        out = _cli(*([command] if command else []), "--help")
        assert out.returncode == 0, command
        assert "`" not in out.stdout, (command, out.stdout)
        assert not re.search(r"\w+/\w+\.py|egm/commands|lives in", out.stdout), (command, out.stdout)


def test_parse_exits_1_on_an_unparseable_completion_and_0_on_a_good_one():
    bad = subprocess.run([sys.executable, "-m", "egm.cli", "parse", "--width", "10", "--height", "10"],
                         input="no answer here", capture_output=True, text=True, timeout=HANG_S, env=_env())
    assert bad.returncode == 1 and json.loads(bad.stdout)["status"] == "unparseable"
    assert "unparseable" in _one_error_line(bad)
    good = subprocess.run([sys.executable, "-m", "egm.cli", "parse", "--width", "10", "--height", "10"],
                          input='</think>\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```',
                          capture_output=True, text=True, timeout=HANG_S, env=_env())
    assert good.returncode == 0 and json.loads(good.stdout)["status"] == "ok"


def test_exit_codes_live_in_one_table():
    from egm.cli import drive, errors

    assert (errors.EXIT_OK, errors.EXIT_ERROR, errors.EXIT_USAGE, errors.EXIT_CONFIG) == (0, 1, 2, 2)
    assert drive.EXIT_USAGE is errors.EXIT_USAGE and drive.EXIT_NOT_DONE is errors.EXIT_NOT_DONE
    offenders = []
    for path in (ROOT / "cli").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\breturn [1-9]\d*\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "use the names in cli/errors.py:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- output for people and services


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log_with(stream, service: bool, **env: str) -> str:
    from egm.config.settings import Settings
    from egm.logs import configure_logging

    settings = Settings(**env)
    configure_logging(settings, stream=stream, service=service)
    try:
        logging.getLogger("egm.test").warning("Label Studio write failed", extra={"job_id": "j1"})
        logging.getLogger("egm.test").info("batch done")
    finally:
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if not getattr(h, "_egm", False)]
    return stream.getvalue()


def test_commands_write_plain_text_on_a_terminal_and_json_otherwise():
    text = _log_with(_Terminal(), service=False)
    assert text == "warning: Label Studio write failed (job_id=j1)\n"  # no info lines for a command
    piped = _log_with(io.StringIO(), service=False)
    assert json.loads(piped)["msg"] == "Label Studio write failed"


def test_services_keep_json_lines_on_a_terminal_unless_told_otherwise():
    lines = _log_with(_Terminal(), service=True).splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["Label Studio write failed", "batch done"]
    assert _log_with(_Terminal(), service=True, EGM_LOG_FORMAT="text").startswith("warning: ")
    assert json.loads(_log_with(_Terminal(), service=False, EGM_LOG_FORMAT="json"))["level"] == "warning"


# --------------------------------------------------------------------------- make clean, install


def test_make_clean_removes_build_state_and_caches(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for folder in (".egm/tiny-model-v3", "egm_assist.egg-info", "out/demo", ".pytest_cache"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "keep.py").write_text("")
    out = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Makefile", "keep.py"]


def test_make_demo_shows_pip_progress():
    makefile = (ROOT / "Makefile").read_text()
    flags = re.search(r"^PIP_FLAGS \?=(.*)$", makefile, re.M).group(1).split()
    assert "-q" not in flags and "--quiet" not in flags


def test_license_is_an_spdx_string_so_installing_prints_no_setuptools_warning():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # a TOML table is deprecated (setuptools warns)
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


# --------------------------------------------------------------------------- the README is true


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_command_table_lists_every_command_with_flags_that_exist():
    from egm.cli.main import COMMANDS, build_parser

    parser = build_parser()
    rows = [line for line in _readme_section("Command line").splitlines() if line.startswith("| `egm-assist ")]
    listed = set()
    for row in rows:
        usage = row.split("`")[1]
        command = usage.split()[1]
        listed.add(command)
        options = set(parser.subcommands[command]._option_string_actions)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", usage):
            assert flag in options, f"README: `{usage}` - {command} has no {flag}"
    assert listed == {c.replace("_", "-") for c in COMMANDS}


def test_readme_prelabel_examples_use_real_flags():
    from egm.cli.main import build_parser

    options = set(build_parser().subcommands["prelabel"]._option_string_actions)
    examples = [line for line in (ROOT / "README.md").read_text().splitlines()
                if line.lstrip().startswith("egm-assist prelabel")]
    assert examples
    for line in examples:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line.split("#")[0]):
            assert flag in options, line


def test_readme_states_the_prerequisites_a_fresh_machine_lacks():
    quickstart = _readme_section("Quickstart")
    for needed in ("python3-venv", "redis-server", "GB of disk"):
        assert needed in quickstart, needed


# --------------------------------------------------------------------------- the demo's file imports


def test_demo_import_file_and_labeling_config_import_into_label_studio_as_documented(label_studio, tmp_path):
    """The README's four steps, done through Label Studio's API: every task arrives with its prediction,
    and Label Studio serves each task's image."""
    folder = label_studio.local_files_root / f"demo-{os.getpid()}"
    folder.mkdir(parents=True)
    for p in SAMPLES.glob("*.jpg"):
        shutil.copy(p, folder / p.name)
    out_dir = tmp_path / "demo"
    out = _cli("demo", "--engine", "scripted", "--images", str(folder), "--out", str(out_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={label_studio.local_files_root}" in out.stdout

    project = label_studio.create_project((out_dir / "labeling_config.xml").read_text())
    label_studio.call("POST", "/api/storages/localfiles/",
                      json={"project": project, "path": str(folder), "title": "demo", "use_blob_urls": True})
    tasks = json.loads((out_dir / "label_studio_import.json").read_text())
    label_studio.call("POST", f"/api/projects/{project}/import", json=tasks)

    stored = label_studio.call("GET", "/api/tasks/", params={"project": project, "page_size": 100})
    stored = stored["tasks"] if isinstance(stored, dict) else stored
    assert len(stored) == len(list(SAMPLES.glob("*.jpg")))
    assert len(label_studio.list_predictions(project)) == len(stored)
    for task in stored:
        image = task["data"]["image"]
        assert image.startswith(f"/data/local-files/?d={folder.name}/")
        served = label_studio.admin.get(image)
        assert served.status_code == 200 and served.content[:2] == b"\xff\xd8", image  # the JPEG itself


def test_worker_whose_model_dir_does_not_exist_is_one_line_without_loading_anything(redis_url):
    out = _cli("worker", REDIS_URL=redis_url, MODEL_DIR="/nonexistent", EGM_ENGINE="hf")
    assert out.returncode == 1
    assert "MODEL_DIR /nonexistent does not exist" in _one_error_line(out)


def test_serve_on_a_port_in_use_is_one_line(redis_server):
    out = _cli("serve", "--port", str(redis_server.port), REDIS_URL=redis_server.url)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{redis_server.port}" in _one_error_line(out)


def test_prelabel_killed_with_sigterm_stops_its_local_workers(redis_url, images, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "egm.cli", "prelabel", "--folder", str(images), "--labels",
                             "circle", "--local-workers", "1", "--engine", "scripted", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env(REDIS_URL=redis_url, EGM_SCRIPTED_DELAY_S="600"))
    worker_name = f"prelabel-{proc.pid}-0"
    try:
        deadline = time.monotonic() + HANG_S
        seen = []
        while not any(line.startswith("run ") for line in seen):  # planned: the worker is ready and busy
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen) + proc.stdout.read()
            seen.append(proc.stderr.readline())
        assert "scripted engine" in seen[0]  # where the workers' model comes from
        assert _pids_with(worker_name)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated" in err and "resume:" in err
    assert not _pids_with(worker_name), "the local worker outlived prelabel"
