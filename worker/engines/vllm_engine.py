"""In-process vLLM engine for production GPU workers.

vLLM is optional (``pip install 'egm-assist[vllm]'``) and imported only when the engine is
created. The whole batch goes to one ``LLM.generate`` call, which schedules it with
continuous batching and paged attention; prefix caching reuses the image's KV blocks
when several prompts share an image (per-label mode), since the image comes first.

Request building and output conversion are small pure functions (tested with a stub
``vllm`` module); the class only wires them to a loaded ``LLM``.
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from PIL import Image

from egm.config.settings import Settings
from egm.worker.engines.base import (DecodingConfig, Engine, EngineError, EngineOutput, EngineRequest, ServedModel,
                                     local_checkpoint)
from egm.images.decode import to_rgb
from egm.worker.engines.served import align_pieces, fit_within_pixels

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'egm-assist[vllm]'"
#: what Qwen3-VL's chat template writes for one image; vLLM expands the pad to the image's tokens
IMAGE_PAD = "<|image_pad|>"
#: Qwen3-VL: 16-pixel patches merged 2x2, so one visual token per 32x32 pixels
IMAGE_FACTOR = 32
MAX_ASPECT_RATIO = 200
#: end-of-turn strings that must not end the EGM text if a vLLM version keeps them
STOP_STRINGS = ("<|im_end|>", "<|endoftext|>")


class VLLMNotInstalledError(ImportError, EngineError):
    """vLLM is missing: the vllm engine cannot start."""


def import_vllm() -> ModuleType:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise VLLMNotInstalledError(
            f"EGM_ENGINE=vllm needs vLLM, which cannot be imported ({exc}). Install it with: {INSTALL_HINT} "
            "(Linux + CUDA GPU), or use EGM_ENGINE=hf, or EGM_ENGINE=openai with a `vllm serve` server."
        ) from exc


# --- pure request building -------------------------------------------------------------


@dataclass(frozen=True)
class VLLMOptions:
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 8192
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True


def llm_kwargs(model_path: str, options: VLLMOptions, max_pixels: int, min_pixels: int) -> dict[str, Any]:
    """Arguments of ``vllm.LLM``: one image per prompt, resized by the processor to our pixel cap."""
    return {
        "model": model_path,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"max_pixels": max_pixels, "min_pixels": min_pixels},
        "max_model_len": options.max_model_len,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "tensor_parallel_size": options.tensor_parallel_size,
        "enable_prefix_caching": options.enable_prefix_caching,
        "trust_remote_code": False,
        # vLLM >= 0.10 guesses the runner from config.architectures; a checkpoint saved without it
        # (config-only folders, some conversions) is taken for an embedding model. EGM generates.
        "runner": "generate",
    }


def sampling_kwargs(decoding: DecodingConfig) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams``.

    ``skip_special_tokens=False`` keeps ``</think>`` in the text even where a checkpoint marks
    it special (vLLM still leaves the end-of-turn token that stopped generation out of the
    text); ``logprobs=0`` returns the log-prob of each chosen token only.
    """
    return {
        "n": 1,  # K samples for the uncertainty score are K requests (the batch pipeline's)
        "temperature": max(0.0, decoding.temperature),
        "top_p": decoding.top_p,
        "top_k": decoding.top_k if decoding.top_k > 0 else 0,  # 0: no top-k cut
        "max_tokens": decoding.max_new_tokens,
        "logprobs": 0,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    """One user turn, image first, no system prompt: the layout EGM was trained and evaluated with."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def build_prompt(tokenizer: Any, prompt: str) -> str:
    return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)


def image_token_count(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR) -> int:
    """Visual tokens Qwen3-VL's processor makes of a ``width`` x ``height`` image: sides snapped
    to multiples of ``factor``, area kept within [min_pixels, max_pixels]."""
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {width}x{height} is too elongated (aspect ratio above {MAX_ASPECT_RATIO})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return (h // factor) * (w // factor)


@dataclass
class PreparedRequest:
    """One request ready for ``LLM.generate``."""

    inputs: dict[str, Any]
    prompt_tokens: int


def prepare_request(
    tokenizer: Any, request: EngineRequest, max_pixels: int, min_pixels: int, max_model_len: int
) -> PreparedRequest:
    """Prompt + image for vLLM; raises ValueError when this request cannot run (the caller
    turns that into this request's error, so one bad request never fails ``generate``)."""
    image = to_rgb(fit_within_pixels(request.image, max_pixels))
    text = build_prompt(tokenizer, request.prompt)
    pads = text.count(IMAGE_PAD)
    if pads != 1:
        raise ValueError(f"chat template produced {pads} image placeholders, expected 1")
    text_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    image_tokens = image_token_count(image.width, image.height, min_pixels, max_pixels)
    total = text_tokens - pads + image_tokens
    if total >= max_model_len:
        raise ValueError(
            f"prompt needs {total} tokens ({image_tokens} for the image) but the context is {max_model_len}; "
            "shorten the prompt, lower EGM_MAX_PIXELS or raise EGM_VLLM_MAX_MODEL_LEN"
        )
    return PreparedRequest({"prompt": text, "multi_modal_data": {"image": image}}, total)


# --- pure output conversion ----------------------------------------------------------


def _strip_stop_strings(text: str, extra: tuple[str, ...] = ()) -> str:
    for stop in STOP_STRINGS + extra:
        if stop and text.endswith(stop):
            return text[: -len(stop)]
    return text


def _chosen_logprobs(token_ids: list[int], steps: Any) -> tuple[list[str], list[float]] | None:
    """Decoded piece and log-prob of each chosen token from vLLM's per-step ``{id: Logprob}``."""
    pieces: list[str] = []
    values: list[float] = []
    for token_id, step in zip(token_ids, steps):
        entry = step.get(token_id) if step is not None else None
        if entry is None:
            return None
        pieces.append(entry.decoded_token or "")
        values.append(float(entry.logprob))
    if len(pieces) != len(token_ids):
        return None
    return pieces, values


def decode_pieces(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Per-token pieces by decoding growing prefixes: a character split over several byte-level
    tokens goes to the token that completes it. Quadratic, used only when vLLM's own per-token
    strings do not spell the text (multi-byte characters)."""
    pieces: list[str] = []
    previous = ""
    for i in range(1, len(token_ids) + 1):
        current = tokenizer.decode(token_ids[:i], skip_special_tokens=False)
        if (current.endswith("\ufffd") and i < len(token_ids)) or not current.startswith(previous):
            pieces.append("")  # incomplete character: wait for the token that finishes it
            continue
        pieces.append(current[len(previous):])
        previous = current
    return pieces


def completion_to_output(completion: Any, tokenizer: Any = None) -> EngineOutput:
    """EngineOutput from one ``vllm.CompletionOutput`` (text, per-token pieces, log-probs)."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    text = _strip_stop_strings(completion.text, (eos,) if isinstance(eos, str) else ())
    extra = {"finish_reason": completion.finish_reason}
    token_ids = list(completion.token_ids)
    chosen = _chosen_logprobs(token_ids, completion.logprobs) if completion.logprobs is not None else None
    if chosen is None:
        return EngineOutput(text=text, extra=extra)
    pieces, values = chosen
    aligned = align_pieces(text, pieces, values)
    if aligned is None and tokenizer is not None:
        aligned = align_pieces(text, decode_pieces(tokenizer, token_ids), values)
    if aligned is None:
        log.debug("vllm engine: token pieces do not spell the text; log-probs dropped")
        return EngineOutput(text=text, extra=extra)
    text, tokens, logprobs = aligned
    return EngineOutput(text=text, tokens=tokens, logprobs=logprobs, extra=extra)


def request_output_to_output(request_output: Any, tokenizer: Any = None) -> EngineOutput:
    """EngineOutput from one ``vllm.RequestOutput`` (its first completion: one answer per request)."""
    completions = sorted(request_output.outputs, key=lambda c: c.index)
    if not completions:
        return EngineOutput(text="", error="vLLM returned no completion")
    first = completion_to_output(completions[0], tokenizer)
    prompt_ids = getattr(request_output, "prompt_token_ids", None)
    first.prompt_tokens = len(prompt_ids) if prompt_ids is not None else None
    return first


# --- the engine ----------------------------------------------------------------------


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        decoding: DecodingConfig,
        max_pixels: int,
        min_pixels: int = 784,
        options: VLLMOptions | None = None,
        extra_llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(decoding, max_pixels, min_pixels)
        vllm = import_vllm()
        self.model_path = model_path
        self.options = options or VLLMOptions()
        kwargs = llm_kwargs(model_path, self.options, max_pixels, min_pixels) | (extra_llm_kwargs or {})
        log.info("vllm engine: loading %s (max_model_len=%d, tp=%d)", model_path, self.options.max_model_len,
                 self.options.tensor_parallel_size)
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling = vllm.SamplingParams(**sampling_kwargs(decoding))
        self._check_chat_template()

    @classmethod
    def from_settings(cls, settings: Settings, decoding: DecodingConfig | None = None) -> VLLMEngine:
        decoding = decoding or DecodingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
        options = VLLMOptions(gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                              max_model_len=settings.vllm_max_model_len,
                              tensor_parallel_size=settings.vllm_tensor_parallel_size)
        return cls(settings.model_path, decoding, max_pixels=settings.max_pixels, min_pixels=settings.min_pixels,
                   options=options)

    def _check_chat_template(self) -> None:
        """Fail at start-up, not per request, when the checkpoint cannot build EGM prompts."""
        try:
            probe = build_prompt(self.tokenizer, "probe")
        except Exception as exc:
            raise EngineError(f"the tokenizer of {self.model_path} cannot apply a chat template: {exc}") from exc
        if probe.count(IMAGE_PAD) != 1:
            raise EngineError(f"the chat template of {self.model_path} does not place one {IMAGE_PAD} for an image; "
                              "is this a Qwen3-VL/EGM checkpoint?")

    def _prepare(self, request: EngineRequest) -> PreparedRequest | str:
        try:
            return prepare_request(self.tokenizer, request, self.max_pixels, self.min_pixels,
                                   self.options.max_model_len)
        except Exception as exc:
            return f"cannot prepare request: {type(exc).__name__}: {exc}"

    def _run_one(self, prepared: PreparedRequest) -> EngineOutput:
        try:
            result = self.llm.generate([prepared.inputs], self.sampling, use_tqdm=False)[0]
            return request_output_to_output(result, self.tokenizer)
        except Exception as exc:
            return EngineOutput(text="", error=f"vLLM failed: {type(exc).__name__}: {exc}")

    def _run(self, batch: list[PreparedRequest]) -> list[EngineOutput]:
        """The batch in one generate call; if that call fails, each request alone (so a request
        vLLM rejects fails by itself) and EngineError only if none of them works."""
        try:
            results = self.llm.generate([p.inputs for p in batch], self.sampling, use_tqdm=False)
        except Exception as exc:
            log.warning("vllm engine: batch of %d failed (%s: %s); retrying one by one", len(batch),
                        type(exc).__name__, exc)
            outputs = [self._run_one(p) for p in batch]
            if all(o.error for o in outputs):
                raise EngineError(f"vLLM failed for the whole batch: {outputs[0].error}") from exc
            return outputs
        if len(results) != len(batch):
            raise EngineError(f"vLLM returned {len(results)} outputs for {len(batch)} prompts")
        outputs = []
        for result in results:
            try:
                outputs.append(request_output_to_output(result, self.tokenizer))
            except Exception as exc:
                outputs.append(EngineOutput(text="", error=f"cannot read vLLM output: {type(exc).__name__}: {exc}"))
        return outputs

    def generate(self, requests: list[EngineRequest], between_steps=None) -> list[EngineOutput]:
        # between_steps is ignored: this engine cannot pause a batch (Engine.pauses is False)
        prepared = [self._prepare(r) for r in requests]
        ready = [i for i, p in enumerate(prepared) if isinstance(p, PreparedRequest)]
        outputs: list[EngineOutput] = [
            EngineOutput(text="", error=p) if isinstance(p, str) else EngineOutput(text="") for p in prepared
        ]
        if ready:
            for i, output in zip(ready, self._run([prepared[i] for i in ready])):  # type: ignore[misc]
                outputs[i] = output
        return outputs

    def served_model(self) -> ServedModel:
        from egm.identity import version_name

        vllm = import_vllm()
        # the dtype vLLM chose (auto -> the checkpoint's); its location moved between vLLM releases
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        dtype = str(getattr(config, "dtype", "auto")).removeprefix("torch.")
        return ServedModel(name=version_name(self.model_path), checkpoint=local_checkpoint(self.model_path),
                           runtime={"library": "vllm", "version": getattr(vllm, "__version__", "unknown"),
                                    "dtype": dtype})

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(model=self.model_path, max_model_len=self.options.max_model_len,
                    tensor_parallel_size=self.options.tensor_parallel_size)
        return info

    def close(self) -> None:
        # vLLM frees its workers and KV cache when the LLM object is collected
        self.llm = None
        gc.collect()
