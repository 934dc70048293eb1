"""Helpers shared by subcommands: environment overrides from flags, logging setup."""

from __future__ import annotations

import os

from config.settings import Settings, reload_settings
from egm.logs import configure_logging


def settings_from_flags(**env: object) -> Settings:
    """Flags win over the environment: write them as variables, then read the settings once."""
    for name, value in env.items():
        if value is not None:
            os.environ[name] = str(value)
    settings = reload_settings()
    configure_logging(settings)
    return settings
