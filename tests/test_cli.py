"""The command-line tool: parse, config table, logging redaction."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from egm.cli.commands.config import markdown_table
from egm.logs import RedactingFilter, configure_logging
from egm.redaction import redact

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "egm.cli", *args], input=stdin.encode(), capture_output=True,
                          cwd=ROOT, timeout=60)


def test_parse_prints_reasoning_grid_and_pixel_boxes():
    completion = ("The lady in the blue shirt stands right of center.\n</think>\n\n```json\n[\n"
                  '\t{"bbox_2d": [444, 468, 757, 745], "label": "lady"}\n]\n```')
    out = _cli("parse", "--width", "640", "--height", "480", stdin=completion)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["status"] == "ok"
    assert doc["reasoning"] == "The lady in the blue shirt stands right of center."
    assert doc["boxes"] == [{"label": "lady", "bbox_2d": [444, 468, 757, 745],
                             "pixels": [284.16, 224.64, 484.48, 357.6]}]


def test_parse_never_crashes_on_garbage_and_exits_1_when_unparseable():
    out = _cli("parse", "--width", "10", "--height", "10", stdin="\x00\xff not an answer [1, 2")
    assert out.returncode == 1
    assert json.loads(out.stdout)["status"] == "unparseable"
    assert out.stderr.decode().count("\n") == 1 and "unparseable" in out.stderr.decode()


def test_parse_rejects_bad_size():
    out = _cli("parse", "--width", "0", "--height", "10", stdin="x")
    assert out.returncode == 2 and "positive" in out.stderr.decode()


def test_every_subcommand_is_listed():
    out = _cli("--help")
    for name in ("demo", "serve", "worker", "parse", "config", "build-tiny-model"):
        assert name in out.stdout.decode()


def test_configuration_doc_is_up_to_date():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table() in doc, "docs/configuration.md is stale: run egm-assist config --markdown"


@pytest.mark.parametrize("text,secret", [
    ("Authorization: Token abcdef0123456789", "abcdef0123456789"),
    ('{"Authorization": "Bearer eyJhbGciOi.payload.sig"}', "eyJhbGciOi.payload.sig"),
    ("GET http://x/data/upload/a.png?token=s3cr3t-token&x=1", "s3cr3t-token"),
    ("redis://user:hunter2pass@redis:6379/0", "hunter2pass"),
    ('{"password": "correct-horse-battery"}', "correct-horse-battery"),
])
def test_redact_removes_credentials(text, secret):
    assert secret not in redact(text)


def test_log_lines_are_json_and_never_carry_configured_secrets(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "ls-key-0123456789abcdef")
    monkeypatch.setenv("BASIC_AUTH_PASS", "basic-pass-42")
    from egm.config.settings import reload_settings

    settings = reload_settings()
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    log = logging.getLogger("egm.test")
    log.info("calling %s with %s", "http://ls", "ls-key-0123456789abcdef", extra={"auth": "basic-pass-42"})
    try:
        raise RuntimeError("failed with key ls-key-0123456789abcdef")
    except RuntimeError:
        log.exception("boom")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [entry["msg"].split()[0] for entry in lines] == ["calling", "boom"]
    text = stream.getvalue()
    assert "ls-key-0123456789abcdef" not in text and "basic-pass-42" not in text
    assert "RuntimeError" in lines[1]["exc"]
    logging.getLogger().handlers = [h for h in logging.getLogger().handlers if not getattr(h, "_egm", False)]
    monkeypatch.undo()
    reload_settings()


def test_filter_leaves_ordinary_messages_alone():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "batch done in %d ms", (12,), None)
    RedactingFilter(["unrelated-secret"]).filter(record)
    assert record.getMessage() == "batch done in 12 ms"
