"""Engine implementations behind one interface (:mod:`egm.worker.engines.base`).

``create_engine`` picks one from the settings; heavy modules (torch, vllm) are
imported only by the engine that needs them.
"""

from __future__ import annotations

from pathlib import Path

from egm.config.settings import Settings
from egm.worker.engines.base import DecodingConfig, Engine, EngineError, EngineOutput, EngineRequest, ServedModel

__all__ = ["DecodingConfig", "Engine", "EngineError", "EngineOutput", "EngineRequest", "ServedModel", "create_engine",
           "decoding_from_settings"]


def decoding_from_settings(settings: Settings) -> DecodingConfig:
    return DecodingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)


def check_model_dir(settings: Settings, kind: str) -> None:
    """A MODEL_DIR that is not there fails at once, in words, before torch or vllm is even imported."""
    if kind not in ("hf", "vllm") or not settings.model_dir:
        return
    folder = Path(settings.model_dir).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise EngineError(f"MODEL_DIR {settings.model_dir} {what}: set it to the checkpoint's folder (the one "
                          f"with config.json and the *.safetensors weights)")


def create_engine(settings: Settings, kind: str | None = None) -> Engine:
    kind = kind or settings.engine
    check_model_dir(settings, kind)
    decoding = decoding_from_settings(settings)
    if kind == "hf":
        from egm.worker.engines.hf import HFEngine

        return HFEngine(settings.model_path, decoding, max_pixels=settings.max_pixels,
                        min_pixels=settings.min_pixels, device=settings.device, dtype=settings.dtype,
                        compile=settings.compile, batch_size=settings.batch_size)
    if kind == "vllm":
        from egm.worker.engines.vllm_engine import VLLMEngine

        return VLLMEngine.from_settings(settings, decoding)
    if kind == "openai":
        from egm.worker.engines.openai_compat import OpenAICompatEngine

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAICompatEngine(settings.openai_base_url, decoding, max_pixels=settings.max_pixels,
                                  min_pixels=settings.min_pixels, api_key=key, model=settings.openai_model,
                                  concurrency=settings.openai_concurrency, timeout_s=settings.openai_timeout_s)
    if kind == "scripted":
        from egm.worker.engines.scripted import ScriptedEngine

        return ScriptedEngine(decoding, template=settings.scripted_response, delay_s=settings.scripted_delay_s)
    raise ValueError(f"unknown engine {kind!r}; choose hf, vllm, openai or scripted")
