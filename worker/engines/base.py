"""The engine interface: a batch of (image, prompt) in, EGM completions out.

Every engine (transformers, vLLM in-process, OpenAI-compatible server, scripted)
implements :class:`Engine`. Engines are created once per worker process and
stay loaded across jobs. Nothing outside ``worker/`` imports torch or vllm;
the heavy imports happen inside each engine module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image


class EngineError(RuntimeError):
    """The engine could not produce an output (for one request or the whole batch)."""


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding settings; part of ``model_version``. temperature 0 = greedy, as EGM is evaluated.

    One answer per request: K sampled answers for the uncertainty score are K requests, made
    by the batch pipeline (``EGM_UNCERTAINTY_SAMPLES``), the same on every engine."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 20

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class EngineRequest:
    image: Image.Image
    prompt: str
    request_id: str = ""


@dataclass
class EngineOutput:
    text: str
    #: generated tokens as text pieces (concatenated they give ``text``), when the engine exposes them.
    tokens: list[str] | None = None
    #: log-probability of each generated token (same length as ``tokens``).
    logprobs: list[float] | None = None
    prompt_tokens: int | None = None
    #: the exception when this request alone failed; the batch goes on.
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServedModel:
    """What an engine really serves, as it reports it once loaded; the worker's identity
    (:mod:`egm.worker.identity`) is built from it, never from the settings it was asked for."""

    #: the human part of ``model_version``: checkpoint folder, served model id, "scripted".
    name: str
    #: local checkpoint folder the weights were read from (hub ids resolved to their snapshot); the
    #: worker fingerprints its content.
    checkpoint: str | None = None
    #: whatever else names the model: a server's id, root and base URL; a script's digest.
    details: dict[str, Any] = field(default_factory=dict)
    #: what runs it: library, version, dtype.
    runtime: dict[str, Any] = field(default_factory=dict)


#: called by an engine at points where the batch it runs can wait (see ``Engine.generate``)
BetweenSteps = Callable[[], None]


class Engine(abc.ABC):
    """A loaded model that turns a batch of requests into completions."""

    name: str = "engine"
    #: True when ``generate`` calls its ``between_steps`` hook (the batch can pause for other work):
    #: ``hf`` (fast path: before the prefill, inside it and every few decode steps; plain path: between
    #: chunks of ``EGM_BATCH_SIZE``) and ``scripted`` (during its simulated GPU time). ``vllm`` and
    #: ``openai`` accept the hook and ignore it: vLLM's offline engine cannot be re-entered, and a
    #: server schedules its requests itself.
    pauses: bool = False
    #: True when the model can change under a running worker (a server behind a URL): the worker then
    #: asks :meth:`served_model` again between jobs. A loaded checkpoint cannot change.
    model_can_change: bool = False

    def __init__(self, decoding: DecodingConfig, max_pixels: int, min_pixels: int = 784) -> None:
        self.decoding = decoding
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels

    @abc.abstractmethod
    def generate(self, requests: list[EngineRequest], between_steps: BetweenSteps | None = None) -> list[EngineOutput]:
        """One output per request, in order. Per-request failures go into ``EngineOutput.error``;
        raise :class:`EngineError` only when the whole batch failed.

        ``between_steps``: when the engine ``pauses``, it calls this where the batch can wait (the worker
        then runs a waiting interactive job to completion, through this same ``generate``, one level
        deep); the batch's outputs are the same with or without the pause. An exception from it is
        logged and ends the pauses of this batch, never the batch. Engines that cannot pause ignore it."""

    @abc.abstractmethod
    def served_model(self) -> ServedModel:
        """What this engine serves right now. A served model may change under a running worker
        (another model behind the same URL): the worker asks again between jobs."""

    def describe(self) -> dict[str, Any]:
        """What identifies this engine's outputs (model, decoding, image cap), for logs and status."""
        return {"engine": self.name, "decoding": self.decoding.__dict__, "max_pixels": self.max_pixels}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release GPU memory / connections."""


def local_checkpoint(model_path: str) -> str | None:
    """The folder the weights of ``model_path`` are read from: the folder itself, or for a hub id the
    local snapshot the loader used (None when it cannot be found, e.g. an in-memory model)."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        return str(local.resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not a hub id, or not in the local cache
        return None
