"""The transformers engine: a Qwen3-VL / EGM checkpoint loaded in-process.

Two decoding paths share preprocessing and postprocessing:

* plain (``compile=False``): ``model.generate`` with a dynamic cache. The reference path.
* fast (``compile=True``): :class:`worker.engines.hf_fast.StaticCacheDecoder`, a static KV
  cache and one CUDA graph per decode step (optionally Inductor-compiled). On the CPU the
  same code runs eagerly; tests check it gives the same greedy text as the plain path.

A batch is validated per request (bad images become per-request errors), sorted by image
size so that rows of one chunk pad little, run in chunks of ``batch_size`` and put back in
request order. A chunk that fails is retried in halves, so one poisoned request (or an
out-of-memory on a big chunk) does not take the others down.

Pauses (``between_steps``, :class:`~egm.worker.engines.base.Engine`): both paths pause before
each chunk; the fast path also inside the prefill and every few decode steps (see
:mod:`egm.worker.engines.hf_fast`). What runs in a pause may call :meth:`HFEngine.generate`
once more (one level deep); its own pauses are switched off.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from egm.images.decode import to_rgb
from egm.worker.engines.base import (DecodingConfig, Engine, EngineError, EngineOutput, EngineRequest, ServedModel,
                                     local_checkpoint)

log = logging.getLogger(__name__)

#: Qwen-VL's smart_resize refuses images more elongated than this
MAX_ASPECT_RATIO = 200


@dataclass
class _Prepared:
    index: int
    image: Image.Image
    prompt: str
    visual_tokens: int


class HFEngine(Engine):
    """Qwen3-VL through transformers; see the module docstring."""

    name = "hf"
    pauses = True

    def __init__(
        self,
        model_path: str,
        decoding: DecodingConfig,
        max_pixels: int,
        min_pixels: int,
        device: str = "auto",
        dtype: str = "auto",
        compile: bool = False,
        batch_size: int = 8,
        *,
        ignore_eos: bool = False,
        inductor: bool = True,
    ) -> None:
        dev = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, dev)
        model, processor = load_model(model_path, dev, torch_dtype)
        self.model_path = model_path
        self._setup(model, processor, decoding, max_pixels, min_pixels, compile, batch_size, ignore_eos, inductor)

    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any,
        decoding: DecodingConfig,
        max_pixels: int,
        min_pixels: int,
        compile: bool = False,
        batch_size: int = 8,
        *,
        ignore_eos: bool = False,
        inductor: bool = True,
        model_path: str = "<in-memory>",
    ) -> HFEngine:
        """Wrap an already loaded model + processor (benchmarks, tests)."""
        self = cls.__new__(cls)
        self.model_path = model_path
        self._setup(model.eval(), processor, decoding, max_pixels, min_pixels, compile, batch_size, ignore_eos,
                    inductor)
        return self

    def _setup(self, model, processor, decoding, max_pixels, min_pixels, compile, batch_size, ignore_eos,
               inductor) -> None:
        from egm.worker.engines.hf_text import TokenTextDecoder

        Engine.__init__(self, decoding, max_pixels, min_pixels)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        model.requires_grad_(False)
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch_size = batch_size
        self.compile = compile
        self.ignore_eos = ignore_eos
        self.decoder = TokenTextDecoder(self.tokenizer)
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.pad_id = _pad_id(model, self.tokenizer, self.eos_ids)
        image_processor = processor.image_processor
        self._factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        self._depth = 0  # generate() calls in progress (2 while a batch runs inside another's pause)
        self._fast = None
        if compile:
            from egm.worker.engines.hf_fast import StaticCacheDecoder

            self._fast = StaticCacheDecoder(
                model,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                sampling=_sampling(decoding),
                max_new_tokens=decoding.max_new_tokens,
                max_batch=batch_size,
                stop_on_eos=not ignore_eos,
                inductor=inductor and self.device.type == "cuda",
            )

    # ------------------------------------------------------------------ Engine API

    def served_model(self) -> ServedModel:
        import transformers

        from egm.identity import version_name

        return ServedModel(name=version_name(self.model_path), checkpoint=local_checkpoint(self.model_path),
                           runtime={"library": "transformers", "version": transformers.__version__,
                                    "dtype": str(self.dtype).removeprefix("torch.")})

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        fast = self._fast
        info.update(
            model=self.model_path,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            compile=self.compile,
            decode_path=("static-cache" + ("+cuda-graphs" if fast.cuda_graphs else "")
                         + ("+inductor" if fast.inductor else "")) if fast else "generate",
            batch_size=self.batch_size,
        )
        return info

    def generate(self, requests: list[EngineRequest], between_steps=None) -> list[EngineOutput]:
        if self._depth:
            between_steps = None  # a batch run during another's pause runs straight through
        self._depth += 1
        try:
            return self._generate_all(requests, between_steps)
        finally:
            self._depth -= 1

    def _generate_all(self, requests: list[EngineRequest], between_steps) -> list[EngineOutput]:
        outputs: list[EngineOutput | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, req in enumerate(requests):
            try:
                prepared.append(self._prepare(i, req))
            except Exception as exc:  # noqa: BLE001 - any bad input becomes this request's error
                outputs[i] = EngineOutput(text="", error=f"invalid request: {exc}")
        # similar image sizes side by side: less padding inside each chunk
        prepared.sort(key=lambda p: (p.visual_tokens, len(p.prompt)))
        gen_failures = 0
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start:start + self.batch_size]
            if between_steps is not None:
                _pause_safely(between_steps)
            for p, out in self._run_isolated(chunk, between_steps):
                outputs[p.index] = out
                gen_failures += out.error is not None
        if prepared and gen_failures == len(prepared):
            raise EngineError(f"generation failed for every request: {outputs[prepared[0].index].error}")
        return [o if o is not None else EngineOutput(text="", error="no output") for o in outputs]

    def close(self) -> None:
        import torch

        if self._fast is not None:
            self._fast.reset()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ batching

    def _prepare(self, index: int, req: EngineRequest) -> _Prepared:
        image = _check_image(req.image)
        if not isinstance(req.prompt, str) or not req.prompt.strip():
            raise ValueError("empty prompt")
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = smart_resize(image.height, image.width, factor=self._factor,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return _Prepared(index, image, req.prompt, (h * w) // (self._factor ** 2))

    def _run_isolated(self, chunk: list[_Prepared], between_steps=None) -> list[tuple[_Prepared, EngineOutput]]:
        """Run a chunk; on failure retry its halves, down to single requests."""
        try:
            return list(zip(chunk, self._run_chunk(chunk, between_steps), strict=True))
        except Exception as exc:  # noqa: BLE001
            _free_cuda_memory()
            if len(chunk) == 1:
                log.warning("request %d failed: %s", chunk[0].index, exc)
                return [(chunk[0], EngineOutput(text="", error=f"{type(exc).__name__}: {exc}"))]
            mid = len(chunk) // 2
            log.warning("chunk of %d failed (%s); retrying in halves", len(chunk), exc)
            return self._run_isolated(chunk[:mid], between_steps) + self._run_isolated(chunk[mid:], between_steps)

    def _encode(self, chunk: list[_Prepared]) -> dict[str, Any]:
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.prompt}]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p in chunk
        ]
        extra = {"device": str(self.device)} if self.device.type == "cuda" else {}  # resize/normalise on the GPU
        enc = self.processor(
            text=texts,
            images=[p.image for p in chunk],
            padding=True,
            return_tensors="pt",
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            **extra,
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _run_chunk(self, chunk: list[_Prepared], between_steps=None) -> list[EngineOutput]:
        import torch

        t0 = time.perf_counter()
        enc = self._encode(chunk)
        encode_s = time.perf_counter() - t0
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            if self._fast is not None:
                tokens, logprobs = self._fast.generate(enc, between_steps=between_steps)
            else:
                tokens, logprobs = self._generate_plain(enc)
        elapsed = time.perf_counter() - t0
        timings = {"encode_s": round(encode_s, 4), "batch_seconds": round(elapsed, 4)}
        if self._fast is not None and self._fast.timing:
            timings.update({k: round(v, 4) for k, v in self._fast.last_timings.items()})
        outs = []
        for row in range(len(chunk)):
            ids, lps = self._trim(tokens[row].tolist(), logprobs[row].tolist())
            pieces = self.decoder.pieces(ids)
            outs.append(EngineOutput(
                text="".join(pieces), tokens=pieces, logprobs=lps, prompt_tokens=int(prompt_tokens[row]),
                extra={"generated_tokens": len(ids), "batch_size": len(chunk), **timings},
            ))
        return outs

    def _trim(self, ids: list[int], lps: list[float]) -> tuple[list[int], list[float]]:
        """Cut at the first EOS (excluded), unless EOS is ignored (benchmarks)."""
        if not self.ignore_eos:
            for j, tok in enumerate(ids):
                if tok in self.eos_ids:
                    return ids[:j], lps[:j]
        return ids, lps

    def _generate_plain(self, enc: dict[str, Any]):
        from transformers import LogitsProcessorList

        d = self.decoding
        recorder = _ChosenLogprobs()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=d.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([recorder]),
            return_dict_in_generate=True,
        )
        if self.ignore_eos:
            kwargs["min_new_tokens"] = d.max_new_tokens
        if d.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k)
        out = self.model.generate(**enc, **kwargs)
        seq = out.sequences[:, enc["input_ids"].shape[1]:]
        lps = recorder.finish(seq)
        return seq.cpu(), lps.cpu()


class _ChosenLogprobs:
    """Logits processor that records log p(chosen token) for each step, on the device.

    At step k it sees the scores of step k and the ids chosen up to k-1, so it keeps only the
    previous step's log-softmax and gathers the token that was chosen from it: no [B, T, V]
    stack of logits, no per-token host work. It is appended after transformers' own
    processors, so with sampling the log-probs are those of the warped distribution.
    """

    def __init__(self) -> None:
        self._prev = None
        self._taken: list[Any] = []

    def __call__(self, input_ids, scores):
        if self._prev is not None:
            self._taken.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self._prev = scores.float().log_softmax(dim=-1)
        return scores

    def finish(self, generated):
        import torch

        if self._prev is not None and generated.shape[1] > len(self._taken):
            self._taken.append(self._prev.gather(1, generated[:, -1:]).squeeze(1))
        self._prev = None
        if not self._taken:
            return torch.zeros(generated.shape, dtype=torch.float32, device=generated.device)
        return torch.stack(self._taken, dim=1)[:, : generated.shape[1]]


# ---------------------------------------------------------------------- helpers

def _check_image(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w < 1 or h < 1:
        raise ValueError(f"image has zero size ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {w}x{h} exceeds {MAX_ASPECT_RATIO}:1")
    image.load()  # a truncated file fails here, not inside the batch
    return image if image.mode == "RGB" else to_rgb(image)


def _sampling(decoding: DecodingConfig):
    from egm.worker.engines.hf_fast import SamplingParams

    if decoding.greedy:
        return SamplingParams(greedy=True)
    return SamplingParams(greedy=False, temperature=decoding.temperature, top_k=decoding.top_k,
                          top_p=decoding.top_p)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(eos if isinstance(eos, list | tuple) else [eos])
    for tok in ("<|im_end|>", tokenizer.eos_token):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok else None
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if not ids:
        raise EngineError("the model declares no end-of-sequence token")
    return sorted(ids)


def _pad_id(model: Any, tokenizer: Any, eos_ids: list[int]) -> int:
    for candidate in (getattr(model.generation_config, "pad_token_id", None), tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return eos_ids[0]


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    return dev


def _resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise EngineError(f"unknown dtype {dtype!r} (use auto, bfloat16, float16 or float32)")
    return resolved


def load_model(model_path: str, device, dtype) -> tuple[Any, Any]:
    """Processor + model from a local folder or a hub id, with an actionable error."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(model_path).expanduser()
    source = str(local) if local.is_dir() else model_path
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, attn_implementation="sdpa", device_map={"": str(device)}
        )
    except (OSError, ValueError) as exc:
        where = "local folder" if local.is_dir() else "folder or Hugging Face Hub id"
        raise EngineError(
            f"could not load the model from {model_path!r} ({where}): {str(exc).strip().rstrip('.')}. "
            "Download the checkpoint and set MODEL_DIR to its folder (or EGM_MODEL_ID to a reachable hub id)."
        ) from exc
    return model.eval(), processor


def _pause_safely(between_steps) -> None:
    """A pause must never fail the batch that offers it."""
    try:
        between_steps()
    except Exception:  # noqa: BLE001
        log.warning("between_steps failed", exc_info=True)


def _free_cuda_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def visual_tokens(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 32) -> int:
    """Visual tokens Qwen3-VL spends on an image of this size (one per factor x factor pixels)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return math.prod((h // factor, w // factor))
