"""One identity per model: what a worker really serves, and the ``model_version`` that names it.

A worker computes its :class:`ModelIdentity` after loading its engine, from what loaded
(``egm.worker.identity``): the engine kind, the model (a content fingerprint of a local
checkpoint, the id a server reports at ``/v1/models`` plus its base URL, or the scripted
engine's answers), the engine runtime (library, version, dtype), the decoding settings and the
prompt setup. ``model_version`` is ``<name>-<digest>``: the name is for people, the digest
changes whenever any part changes. It keys the queues, the result cache, the write claims and
the predictions in Label Studio, so two models never share an answer.

Planners (backend, CLI) never compute a version: they take it from the live workers
(:mod:`egm.fleet`). They build the prompts, though, so they check that their own prompt setup
is the one the version names (:func:`prompt_setup`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, Field

from egm.config.settings import Settings
from egm.prompts import load_templates

DIGEST_CHARS = 10
NAME_CHARS = 48
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def version_name(raw: str) -> str:
    """A readable, queue-name-safe name: ``/models/EGM-4B/`` -> ``EGM-4B``, ``org/m:v1`` -> ``m-v1``."""
    base = raw.rstrip("/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("-", base).strip("-.")[:NAME_CHARS].strip("-.") or "model"


def prompt_setup(settings: Settings) -> dict[str, str]:
    """What of the prompts the planner's settings decide: the templates' digest and the prompt mode."""
    return {"mode": settings.prompt_mode, "templates": load_templates(settings).digest()}


def _digest(material: Any) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


class ModelIdentity(BaseModel):
    """Everything that decides a worker's answers; its digest is the version."""

    engine: str
    #: the human part of the version (checkpoint folder, served model id, "scripted").
    name: str
    #: the model itself: ``{"checkpoint": digest, "path": ...}``, ``{"served_id", "root", "base_url"}``
    #: or ``{"script": digest}``.
    model: dict[str, Any]
    #: what runs it, as the engine reports it: library, version, dtype.
    runtime: dict[str, Any] = Field(default_factory=dict)
    #: decoding and scoring settings that change answers or scores.
    decoding: dict[str, Any] = Field(default_factory=dict)
    #: :func:`prompt_setup` of the worker.
    prompts: dict[str, str] = Field(default_factory=dict)

    def _material(self) -> dict[str, Any]:
        # the path a checkpoint was read from is not part of what it is: a copy has the same version
        model = {k: v for k, v in self.model.items() if k != "path"}
        return {"engine": self.engine, "model": model, "runtime": self.runtime, "decoding": self.decoding,
                "prompts": self.prompts}

    @property
    def digest(self) -> str:
        return _digest(self._material())

    @property
    def model_version(self) -> str:
        return f"{version_name(self.name)}-{self.digest[:DIGEST_CHARS]}"

    def summary(self) -> dict[str, Any]:
        """A short description for status lines and logs (no secrets: base URLs carry none)."""
        return {"model_version": self.model_version, "engine": self.engine, "model_name": self.name, **self.model,
                **{f"runtime_{k}": v for k, v in self.runtime.items()}}
