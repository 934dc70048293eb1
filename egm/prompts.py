"""Prompt templates: loaded from files so they can change without code changes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from egm.config import PROMPTS_DIR
from egm.config.settings import Settings

TEMPLATE_NAMES = ("referring", "multi")


class PromptError(ValueError):
    """A template is missing or lacks its placeholder."""


@dataclass(frozen=True)
class PromptTemplates:
    referring: str
    multi: str

    def referring_prompt(self, expression: str) -> str:
        return self.referring.replace("{expression}", expression.strip())

    def multi_prompt(self, categories: list[str]) -> str:
        return self.multi.replace("{categories}", ", ".join(c.strip() for c in categories))

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in TEMPLATE_NAMES:
            h.update(name.encode() + b"\0" + getattr(self, name).encode() + b"\0")
        return h.hexdigest()


def _read(folder: Path, name: str, placeholder: str) -> str:
    path = folder / f"{name}.txt"
    if not path.is_file():
        path = PROMPTS_DIR / f"{name}.txt"
    text = path.read_text(encoding="utf-8").strip()
    if placeholder not in text:
        raise PromptError(f"prompt template {path} must contain {placeholder}")
    return text


@lru_cache(maxsize=8)
def _load(folder: str) -> PromptTemplates:
    base = Path(folder)
    return PromptTemplates(
        referring=_read(base, "referring", "{expression}"),
        multi=_read(base, "multi", "{categories}"),
    )


def load_templates(settings: Settings) -> PromptTemplates:
    return _load(str(settings.prompt_dir or PROMPTS_DIR))
