"""The vLLM side of ``bench/gpu.py``: real vLLM on the same card, model shapes, images and prompts.

* :func:`offline_call`: vLLM's offline ``LLM`` with dummy (random) weights on a checkpoint folder
  that holds only the config, tokenizer and processor: exactly N new tokens per request (EOS
  ignored, greedy), so it does the fast path's work. Prefix caching and the multimodal input
  cache are off: the benchmark sends the same images again on every repeat, and a cache hit
  would time a prefill that never ran.
* :func:`check_engine`: the project's own :class:`~egm.worker.engines.vllm_engine.VLLMEngine`
  on the real library: every request answered with per-token log-probs, the image's KV blocks
  reused across prompts on one image (prefix caching), and GPU memory handed back on close.

Imports vLLM lazily: ``bench/gpu.py --variants`` without ``vllm`` never touches it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any


def write_dummy_checkpoint(model, processor, folder: Path) -> Path:
    """Config, generation config, tokenizer and processor of ``model``; vLLM's dummy loader makes
    the weights (random, like the fast path's), so 9 GB never touch the disk."""
    folder.mkdir(parents=True, exist_ok=True)
    # save_pretrained of the model sets this; a config saved alone lacks it, and vLLM then guesses
    # an embedding model ("--runner auto" -> pooling)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _free_gib() -> float:
    import torch

    return torch.cuda.mem_get_info()[0] / 2**30


def offline_call(folder: Path, max_batch: int, new_tokens: int, min_pixels: int, max_pixels: int,
                 gpu_memory_utilization: float = 0.8):
    """(call, llm, start-up seconds): ``call(requests)`` runs one ``LLM.generate`` over the batch."""
    import vllm

    from egm.worker.engines.vllm_engine import build_prompt

    t0 = time.perf_counter()
    llm = vllm.LLM(
        model=str(folder), load_format="dummy", dtype="bfloat16", limit_mm_per_prompt={"image": 1},
        mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
        max_model_len=4096, max_num_seqs=max(max_batch, 1), gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=False, mm_processor_cache_gb=0, seed=0, runner="generate",
    )
    startup = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                                 detokenize=True)

    def call(reqs):
        inputs = [{"prompt": build_prompt(tokenizer, r.prompt), "multi_modal_data": {"image": r.image}}
                  for r in reqs]
        outs = llm.generate(inputs, params, use_tqdm=False)
        short = [len(o.outputs[0].token_ids) for o in outs if len(o.outputs[0].token_ids) != new_tokens]
        if len(outs) != len(reqs) or short:
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(reqs)}; token counts {short[:3]}")
        return outs

    return call, llm, startup


def shutdown(llm) -> None:
    """Stop vLLM's engine-core process and free its memory before the next measurement."""
    try:
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    finally:
        del llm
        gc.collect()
        import torch

        torch.cuda.empty_cache()


def check_engine(folder: Path, images: list, prompts: list[str], min_pixels: int, max_pixels: int,
                 new_tokens: int = 32) -> dict[str, Any]:
    """The project's VLLMEngine against real vLLM; every check is recorded, none raises."""
    import psutil

    from egm.worker.engines.base import DecodingConfig, EngineRequest
    from egm.worker.engines.vllm_engine import VLLMEngine, VLLMOptions

    report: dict[str, Any] = {"free_gib_before": _free_gib()}
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.perf_counter()
    engine = VLLMEngine(str(folder), DecodingConfig(max_new_tokens=new_tokens), max_pixels=max_pixels,
                        min_pixels=min_pixels, options=VLLMOptions(gpu_memory_utilization=0.8, max_model_len=4096),
                        extra_llm_kwargs={"load_format": "dummy", "seed": 0})
    report["startup_s"] = time.perf_counter() - t0
    report["free_gib_loaded"] = _free_gib()
    # two prompts per image, image first: the second prompt of an image can reuse its KV blocks
    reqs = [EngineRequest(image=im, prompt=p, request_id=f"{i}:{j}")
            for i, im in enumerate(images) for j, p in enumerate(prompts)]
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    report["generate_s"] = time.perf_counter() - t0
    report["requests"] = len(reqs)
    report["answered"] = sum(1 for o in outs if not o.error and o.text)
    report["errors"] = [o.error for o in outs if o.error][:3]
    report["with_logprobs"] = sum(1 for o in outs if o.logprobs and len(o.logprobs) == len(o.tokens or []))
    report["logprobs_valid"] = all(lp <= 1e-6 for o in outs for lp in (o.logprobs or []))
    report["prompt_tokens"] = sorted({o.prompt_tokens for o in outs if o.prompt_tokens})
    # prefix caching: the same requests again through the engine's own LLM; vLLM reports the
    # prompt tokens it took from the cache per request
    inputs = [engine._prepare(r).inputs for r in reqs]
    again = engine.llm.generate(inputs, engine.sampling, use_tqdm=False)
    cached = [int(getattr(o, "num_cached_tokens", 0) or 0) for o in again]
    report["cached_tokens_second_pass"] = sum(cached)
    report["prefix_caching"] = sum(cached) > 0
    report["same_text_second_pass"] = sum(a.outputs[0].text.startswith(o.text[:16]) for a, o in zip(again, outs))
    engine.close()
    del engine, again
    gc.collect()
    time.sleep(2)
    report["free_gib_after_close"] = _free_gib()
    alive = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before and p.is_running()]
    report["engine_processes_left"] = len(alive)
    report["clean_close"] = (report["free_gib_after_close"] > report["free_gib_before"] - 2.0) and not alive
    report["ok"] = (report["answered"] == len(reqs) and report["with_logprobs"] == len(reqs)
                    and report["logprobs_valid"] and report["prefix_caching"] and report["clean_close"])
    return report
