"""Logging: one JSON object per line for services and machines, plain text for people; secrets redacted.

``EGM_LOG_FORMAT=auto`` (the default) picks per process: the services (``serve``, ``worker``) write
JSON lines, other commands write ``level: message (key=value ...)`` when stderr is a terminal and
JSON otherwise. Commands log warnings and errors only unless ``EGM_LOG_LEVEL`` says otherwise: what
a person needs to read they print; logs are for what went wrong.

Every log record passes through :class:`RedactingFilter`, which applies
:func:`egm.redaction.redact` (known secrets from the settings, credential-looking
pieces, the URL policy) before a handler formats it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from egm.config.settings import Settings
from egm.redaction import redact

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = ()
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = redact(value, self.secrets)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``warning: message (key=value, ...)``; an exception adds its last line, not a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        extras = [f"{k}={v}" for k, v in record.__dict__.items()
                  if k not in _STANDARD_ATTRS and not k.startswith("_") and k != "color_message"]
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if extras:
            text += f" ({', '.join(extras)})"
        if record.exc_text:
            text += f" [{record.exc_text.strip().splitlines()[-1]}]"
        return text


def log_format(settings: Settings, stream, service: bool) -> str:
    """``json`` or ``text``: what ``EGM_LOG_FORMAT`` asks, ``auto`` decided for this process."""
    if settings.log_format != "auto":
        return settings.log_format
    if service:
        return "json"
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure_logging(settings: Settings, stream=None, *, service: bool = True) -> None:
    """Install the redacting handler on the root logger (idempotent). ``service``: a long-running
    process (backend, worker), which logs JSON at INFO unless configured otherwise."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_egm", False):
            root.removeHandler(h)
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler._egm = True  # type: ignore[attr-defined]
    handler.addFilter(RedactingFilter(settings.secret_values()))
    handler.setFormatter(JsonFormatter() if log_format(settings, stream, service) == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel((settings.log_level or ("INFO" if service else "WARNING")).upper())
    # RQ logs job descriptions with arguments; keep it at warning unless debugging.
    logging.getLogger("rq.worker").setLevel(max(logging.INFO, root.level))
    for noisy in ("httpx", "httpcore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
