"""The CLI's flags and the demo build a Settings object; os.environ is never written."""

from __future__ import annotations

import os

import pytest

from egm.cli.commands._common import settings_from_flags
from egm.config.settings import get_settings, reload_settings


@pytest.fixture(autouse=True)
def _fresh_settings():
    reload_settings()
    yield
    reload_settings()


def test_flags_override_the_environment_without_writing_it(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://from-env:8080")
    monkeypatch.delenv("EGM_PORT", raising=False)
    before = dict(os.environ)
    settings = settings_from_flags(LABEL_STUDIO_URL="http://from-flag:9090", EGM_PORT=9191, EGM_HOST=None)
    assert dict(os.environ) == before
    assert settings.label_studio_url == "http://from-flag:9090" and settings.port == 9191
    assert get_settings() is settings  # the rest of the process sees the flags too
    child = settings.environment()  # what the command's own workers and backend are started with
    assert child["LABEL_STUDIO_URL"] == "http://from-flag:9090" and child["EGM_PORT"] == "9191"
    assert settings.is_set("EGM_PORT") and not settings.is_set("EGM_BATCH_SIZE")
    assert reload_settings().label_studio_url == "http://from-env:8080"  # the environment as it was


def test_unknown_flag_variable_is_refused():
    with pytest.raises(ValueError, match="EGM_NO_SUCH"):
        settings_from_flags(EGM_NO_SUCH=1)


def test_secrets_reach_children_in_clear_and_nothing_defaulted_is_passed(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    settings = get_settings().with_overrides(LABEL_STUDIO_API_KEY="key-0123456789")
    env = settings.environment()
    assert env["LABEL_STUDIO_API_KEY"] == "key-0123456789"
    assert "EGM_BATCH_SIZE" not in env or os.environ.get("EGM_BATCH_SIZE")
