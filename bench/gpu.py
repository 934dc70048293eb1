"""GPU benchmark: plain transformers `generate`, HFEngine's fast path and real vLLM, same card, same run.

The model is the full-size EGM-4B architecture (Qwen3-VL-4B shapes) with random bf16 weights
and the small locally trained tokenizer: nothing is downloaded. Every request is one 640x480
image with an EGM prompt, and exactly N new tokens are generated (EOS ignored), so both paths
do the same work. Reported per path and batch size: seconds, images/s, generated tokens/s,
and the ratio to a floor computed from bytes and FLOPs with ceilings measured on this card.

The ``vllm`` variant runs vLLM's offline ``LLM`` on the same shapes (dummy weights, same images
and prompts, exactly N tokens; :mod:`gpu_vllm`), then the project's own ``VLLMEngine`` is
checked against the real library (log-probs, prefix caching, memory back on close). On the
GPU machine vLLM comes from ``bench/gpu_deps`` (docs/gpu.md).

    python3 bench/gpu.py                      # on the GPU machine, from the repo root
    python3 bench/gpu.py --variants inductor,vllm --batches 1,8,32,64,128,256 --no-profile
    python3 bench/gpu.py --tiny               # CPU smoke test of the script itself

Results: a table on stdout, and JSON + Markdown under --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO / "bench"))  # gpu_vllm; the project itself is the installed `egm` package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from egm.worker.engines.base import DecodingConfig, EngineRequest  # noqa: E402
from egm.worker.engines.hf import HFEngine  # noqa: E402
from egm.worker.tiny_model import build_model_and_processor  # noqa: E402

PROMPT = "Locate the {what}, output its bbox coordinates using JSON format"
THINGS = ["red car on the left", "man in the blue shirt", "dog near the bench", "second chair from the left"]
#: datasheet leads, used only when the card cannot be measured (CPU smoke test)
NOMINAL = {"cpu": (50e9, 1e12)}
VARIANTS = ("plain", "inductor", "graphs", "vllm")
FAST = ("inductor", "graphs")


# ---------------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def images(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def requests_for(imgs: list[Image.Image]) -> list[EngineRequest]:
    return [EngineRequest(im, PROMPT.format(what=THINGS[i % len(THINGS)]), str(i)) for i, im in enumerate(imgs)]


def measure_ceilings(device: torch.device) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, on random data."""
    if device.type != "cuda":
        bw, flops = NOMINAL["cpu"]
        return {"copy_bytes_per_s": bw, "bf16_flop_per_s": flops, "measured": False}
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()  # 2 GiB
    y = torch.empty_like(x)
    times = []
    for i in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    bw = 2 * x.numel() * x.element_size() / statistics.median(times)
    del x, y
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    times = []
    for i in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    flops = 2 * n**3 / statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "bf16_flop_per_s": flops, "measured": True}


# ---------------------------------------------------------------------- floor arithmetic

def model_numbers(model) -> dict:
    lm = model.model.language_model
    cfg = model.config.text_config
    vcfg = model.config.vision_config
    elem = next(model.parameters()).element_size()
    layer_params = sum(p.numel() for p in lm.layers.parameters())
    head_params = model.lm_head.weight.numel() + lm.norm.weight.numel()
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    return {
        "text_layer_params": layer_params,
        "lm_head_params": head_params,
        "vision_params": vision_params,
        "bytes_per_param": elem,
        "weight_bytes_per_step": (layer_params + head_params) * elem,
        "kv_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem,
        "layers": cfg.num_hidden_layers,
        "q_width": cfg.num_attention_heads * cfg.head_dim,
        "vision_depth": vcfg.depth,
        "vision_hidden": vcfg.hidden_size,
    }


def floor_for(nums: dict, ceil: dict, batch: int, prompt_len: int, patches: int, new_tokens: int) -> dict:
    """Fewest seconds any implementation needs: prefill FLOPs at the matmul rate plus, per decode
    step, max(bytes / bandwidth, FLOPs / matmul rate)."""
    bw, peak = ceil["copy_bytes_per_s"], ceil["bf16_flop_per_s"]  # the copy rate counts read + written bytes
    p = prompt_len
    text_prefill = 2 * nums["text_layer_params"] * p + 2 * nums["layers"] * p * p * nums["q_width"]  # causal QK+AV
    vision_prefill = 2 * nums["vision_params"] * patches + 4 * nums["vision_depth"] * patches**2 * nums["vision_hidden"]
    prefill_flops = batch * (text_prefill + vision_prefill)
    ctx = p + new_tokens / 2  # average context during decode
    step_bytes = nums["weight_bytes_per_step"] + batch * ctx * nums["kv_bytes_per_token"]
    step_flops = batch * (2 * (nums["text_layer_params"] + nums["lm_head_params"])
                          + 4 * nums["layers"] * ctx * nums["q_width"])
    step_s = max(step_bytes / bw, step_flops / peak)
    prefill_s = prefill_flops / peak
    return {
        "prefill_flops": prefill_flops, "prefill_s": prefill_s,
        "step_bytes": step_bytes, "step_flops": step_flops, "step_s": step_s,
        "decode_s": step_s * new_tokens, "floor_s": prefill_s + step_s * new_tokens,
        "read_bytes_per_s": bw, "flop_per_s": peak,
    }


def explain_floor(f: dict, batch: int, new_tokens: int) -> str:
    return (f"  batch {batch:>3}: decode {f['step_bytes'] / 1e9:.2f} GB/step / {f['read_bytes_per_s'] / 1e12:.2f} TB/s"
            f" = {f['step_bytes'] / f['read_bytes_per_s'] * 1e3:.2f} ms"
            f" (FLOPs {f['step_flops'] / f['flop_per_s'] * 1e3:.2f} ms) x {new_tokens} = {f['decode_s']:.3f} s;"
            f" prefill {f['prefill_flops']:.2e} FLOP / {f['flop_per_s'] / 1e12:.0f} TFLOP/s = {f['prefill_s']:.3f} s;"
            f" floor {f['floor_s']:.3f} s")


# ---------------------------------------------------------------------- the two paths

def plain_generate(model, processor, reqs: list[EngineRequest], new_tokens: int, pixels: tuple[int, int]) -> list[str]:
    """The baseline: what a straightforward transformers user writes."""
    device = next(model.parameters()).device
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.prompt}]}],
            tokenize=False, add_generation_prompt=True)
        for r in reqs
    ]
    enc = processor(text=texts, images=[r.image for r in reqs], padding=True, return_tensors="pt",
                    min_pixels=pixels[0], max_pixels=pixels[1]).to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    generated = out[:, enc["input_ids"].shape[1]:]
    assert generated.shape[1] == new_tokens, generated.shape
    return processor.batch_decode(generated, skip_special_tokens=True)


def run_variant(name: str, call, batches: list[int], imgs, args, device, deadline: float) -> dict:
    """Warm-up + repeats per batch size, then single-image latency; stops early at the deadline."""
    res: dict = {"batches": {}, "latency": None, "error": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for b in batches:
            if time.perf_counter() > deadline:
                res["skipped_after"] = b
                break
            reqs = requests_for(imgs[:b])
            t0 = now(device)
            call(reqs)
            warm = now(device) - t0
            times, phases = [], None
            for _ in range(args.repeats):
                t0 = now(device)
                outs = call(reqs)
                times.append(now(device) - t0)
                phases = getattr(outs, "phases", None) or phases
            med = statistics.median(times)
            res["batches"][b] = {"warmup_s": warm, "seconds": times, "median_s": med,
                                 "images_per_s": b / med, "tokens_per_s": b * args.new_tokens / med}
            print(f"[{name}] batch {b:>3}: {med:7.3f} s  {b / med:8.2f} img/s  (warm-up {warm:.1f} s)", flush=True)
        if time.perf_counter() < deadline:
            reqs = requests_for(imgs[:1])
            reps = args.latency_repeats if name != "plain" else max(3, args.latency_repeats // 3)
            lat = []
            for _ in range(reps):
                t0 = now(device)
                call(reqs)
                lat.append(now(device) - t0)
            res["latency"] = {"p50_s": percentile(lat, 50), "p90_s": percentile(lat, 90), "samples": lat}
            print(f"[{name}] 1 image latency p50 {res['latency']['p50_s']:.3f} s, p90 {res['latency']['p90_s']:.3f} s",
                  flush=True)
    except Exception as exc:  # noqa: BLE001 - record and carry on with the other variants
        import traceback

        traceback.print_exc()
        res["error"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


class _EngineCall:
    def __init__(self, engine: HFEngine, new_tokens: int) -> None:
        self.engine, self.new_tokens = engine, new_tokens
        self.phases: list[dict] = []

    def __call__(self, reqs):
        outs = self.engine.generate(reqs)
        bad = [o.error for o in outs if o.error]
        bad += [len(o.tokens or []) for o in outs if len(o.tokens or []) != self.new_tokens]
        if bad:
            raise RuntimeError(f"engine output wrong: {bad[:3]}")
        self.phases.append(outs[0].extra)
        return outs


def engine_variant(model, processor, args, batch_size: int, inductor: bool) -> tuple[HFEngine, _EngineCall]:
    engine = HFEngine.from_model(
        model, processor, DecodingConfig(max_new_tokens=args.new_tokens), max_pixels=args.max_pixels,
        min_pixels=args.min_pixels, compile=True, batch_size=batch_size, ignore_eos=True, inductor=inductor,
    )
    engine._fast.timing = True  # one sync per phase, to report prefill vs decode time
    return engine, _EngineCall(engine, args.new_tokens)


def profile_call(call, reqs, device: torch.device, path: Path) -> dict:
    """Kernel time by kind for one call (prefill + decode): where the GPU time goes, and how much
    of the wall time the GPU is busy at all."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = now(device)
    with profile(activities=activities) as prof:
        call(reqs)
        sync(device)
    wall = now(device) - t0
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    path.write_text(events.table(sort_by=key, row_limit=40, max_name_column_width=90))
    # kernel rows only: op rows carry their kernels' time too, summing both would count it twice
    kernels = sorted(((getattr(e, key), e.key, e.count) for e in events
                      if "CUDA" in str(getattr(e, "device_type", "")) and getattr(e, key) > 0), reverse=True)
    busy = sum(k[0] for k in kernels) / 1e6
    top = [{"name": n[:80], "ms": round(t / 1e3, 2), "calls": c} for t, n, c in kernels[:12]]
    print(f"profile batch {len(reqs)}: wall {wall:.3f} s (profiled), GPU busy {busy:.3f} s; top kernels:", flush=True)
    for k in top[:6]:
        print(f"    {k['ms']:8.1f} ms  {k['calls']:6d}x  {k['name']}", flush=True)
    return {"wall_s": wall, "gpu_busy_s": busy, "top": top}


def correctness_check(device: torch.device, args) -> dict:
    """Tiny model in fp32 on this device: the fast path must give plain generate's greedy text."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model, processor = build_model_and_processor(full_size=False, device=str(device), dtype="float32", seed=1)
    reqs = requests_for(images(4, 320, 240, seed=3) + images(2, 200, 500, seed=4))
    dec = DecodingConfig(max_new_tokens=32)
    kw = dict(max_pixels=args.max_pixels, min_pixels=args.min_pixels, batch_size=8)
    plain = [o.text for o in HFEngine.from_model(model, processor, dec, compile=False, **kw).generate(reqs)]
    report = {}
    for inductor in ([False, True] if device.type == "cuda" else [False]):
        fast = HFEngine.from_model(model, processor, dec, compile=True, inductor=inductor, **kw)
        texts = [o.text for o in fast.generate(reqs)]
        report["inductor" if inductor else "graphs"] = f"{sum(a == b for a, b in zip(texts, plain))}/{len(plain)}"
        fast._fast.reset()
    del model
    return report


# ---------------------------------------------------------------------- report

def markdown(record: dict) -> str:
    res, floors = record["results"], record["floors"]
    names = [n for n in VARIANTS if n in res]
    lines = [
        f"# GPU benchmark: {record['card']}",
        "",
        f"{record['model_kind']} architecture, random {record['dtype']} weights, {record['image']} images "
        f"({record['prompt_tokens']} prompt tokens), exactly {record['new_tokens']} new tokens, greedy. "
        f"torch {record['torch']}, transformers {record['transformers']}. {record['date']}.",
        "",
        f"Measured ceilings: copy {record['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
        f"bf16 matmul {record['ceilings']['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        "| batch | " + " | ".join(f"{n} s | {n} img/s" for n in names)
        + " | fast / plain | fast / vllm | floor s | fast / floor | vllm / floor |",
        "|---:|" + "---:|---:|" * len(names) + "---:|---:|---:|---:|---:|",
    ]
    for b in record["batches"]:
        row = [str(b)]
        for n in names:
            cell = _cell(res[n], b)
            row += [f"{cell['median_s']:.3f}", f"{cell['images_per_s']:.1f}"] if cell else ["-", "-"]
        fast = _best_fast(res, b)
        vllm = _cell(res.get("vllm", {}), b)
        sp = record["speedup"].get(str(b)) or record["speedup"].get(b)
        fl = floors.get(str(b)) or floors.get(b)
        row += [f"{sp:.2f}x" if sp else "-",
                f"{fast['images_per_s'] / vllm['images_per_s']:.2f}x" if (fast and vllm) else "-",
                f"{fl['floor_s']:.3f}" if fl else "-",
                f"{fast['median_s'] / fl['floor_s']:.2f}x" if (fast and fl) else "-",
                f"{vllm['median_s'] / fl['floor_s']:.2f}x" if (vllm and fl) else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| path | 1-image latency p50 | p90 | peak GPU memory | error |", "|---|---:|---:|---:|---|"]
    for n in names:
        lat = res[n].get("latency") or {}
        mem = res[n].get("peak_mem_gib")
        lines.append(f"| {n} | {lat.get('p50_s', float('nan')):.3f} s | {lat.get('p90_s', float('nan')):.3f} s | "
                     f"{f'{mem:.1f} GiB' if mem is not None else '-'} | {res[n].get('error') or ''} |")
    lines += ["", "Goals: " + ", ".join(f"{k}: {v}" for k, v in record["goals"].items()), ""]
    if record.get("correctness"):
        lines += [f"Fast path vs plain generate, tiny model fp32 on this device (equal greedy texts): "
                  f"{record['correctness']}", ""]
    check = record.get("vllm_engine_check")
    if check:
        lines += [f"The project's VLLMEngine on vLLM {record.get('vllm_version', '?')} (dummy weights): "
                  + ("ok" if check.get("ok") else "FAILED") + " - "
                  + ", ".join(f"{k} {check[k]}" for k in ("answered", "requests", "with_logprobs", "logprobs_valid",
                                                          "cached_tokens_second_pass", "clean_close",
                                                          "free_gib_before", "free_gib_after_close", "error")
                              if k in check), ""]
    return "\n".join(lines)


def _cell(res: dict, b: int) -> dict | None:
    batches = res.get("batches") or {}
    return batches.get(str(b)) or batches.get(b)


def _best_fast(res: dict, b: int) -> dict | None:
    cells = [c for n in FAST if n in res and (c := _cell(res[n], b))]
    return min(cells, key=lambda c: c["median_s"]) if cells else None


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test of this script)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,64,128,256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per image (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size after the warm-up")
    ap.add_argument("--no-profile", action="store_true", help="skip the kernel profile of the fast path")
    ap.add_argument("--latency-repeats", type=int, default=10)
    ap.add_argument("--variants", default="plain,inductor,graphs,vllm",
                    help="plain (transformers generate), inductor (fast path), graphs (fast path without Inductor), "
                         "vllm (vLLM's offline LLM, then a check of the project's VLLMEngine)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--min-pixels", type=int, default=256 * 28 * 28 // 4)
    ap.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new measurements after this")
    ap.add_argument("--no-check", action="store_true", help="skip the tiny-model correctness check")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    batches = [int(b) for b in (args.batches or ("1,2,4" if args.tiny else "1,8,32,64,128,256")).split(",")]
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    variants = [v for v in args.variants.split(",") if v]
    if device.type == "cpu":
        variants = [v for v in variants if v not in ("inductor", "vllm")]  # CPU Inductor compiles for minutes
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    print(f"device: {card}; torch {torch.__version__}", flush=True)

    ceilings = measure_ceilings(device)
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
          f"bf16 matmul {ceilings['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s (measured={ceilings['measured']})", flush=True)

    t0 = time.perf_counter()
    model, processor = build_model_and_processor(full_size=not args.tiny, device=str(device))
    processor.tokenizer.padding_side = "left"
    print(f"model built in {time.perf_counter() - t0:.1f} s: "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {next(model.parameters()).dtype}",
          flush=True)
    imgs = images(max(batches), args.width, args.height)
    enc = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(what=THINGS[0])}]}],
        tokenize=False, add_generation_prompt=True)], images=imgs[:1], return_tensors="pt",
        min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    prompt_len = int(enc["input_ids"].shape[1])
    patches = int(enc["image_grid_thw"].prod())
    nums = model_numbers(model)
    floors = {b: floor_for(nums, ceilings, b, prompt_len, patches, args.new_tokens) for b in batches}
    print(f"floor arithmetic ({prompt_len} prompt tokens, {patches} patches/image, "
          f"{nums['weight_bytes_per_step'] / 1e9:.2f} GB weights read per decode step, "
          f"{nums['kv_bytes_per_token'] / 1e3:.0f} kB KV per token):", flush=True)
    for b in batches:
        print(explain_floor(floors[b], b, args.new_tokens), flush=True)

    record = {
        "card": card, "device": str(device), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model_kind": "tiny Qwen3-VL" if args.tiny else "EGM-4B (Qwen3-VL-4B)",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "image": f"{args.width}x{args.height}", "prompt_tokens": prompt_len, "patches_per_image": patches,
        "new_tokens": args.new_tokens, "batches": batches, "ceilings": ceilings, "model": nums,
        "floors": floors, "results": {}, "speedup": {}, "goals": {}, "correctness": None,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{slug(card)}" + ("-tiny" if args.tiny else "")

    def save() -> None:
        (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(record))

    pixels = (args.min_pixels, args.max_pixels)
    for name in [v for v in variants if v != "vllm"]:
        if time.perf_counter() > deadline:
            record["results"][name] = {"batches": {}, "error": "skipped: time budget"}
            continue
        engine = None
        if name == "plain":
            def call(reqs):
                return plain_generate(model, processor, reqs, args.new_tokens, pixels)
        else:
            engine, call = engine_variant(model, processor, args, max(batches), inductor=(name == "inductor"))
        res = run_variant(name, call, batches, imgs, args, device, deadline)
        if engine is not None:
            res["decode_path"] = engine.describe()["decode_path"]
            res["phases_last"] = call.phases[-1] if call.phases else None
            res["phases_by_batch"] = _phases_by_batch(call.phases)
            engine._fast.reset()
        record["results"][name] = res
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _summarise(record)
        save()

    if "vllm" in variants:
        run_vllm(record, model, processor, args, batches, imgs, device, deadline)
        _summarise(record)
        save()

    if not args.no_check and time.perf_counter() < deadline + 60:
        try:
            record["correctness"] = correctness_check(device, args)
        except Exception as exc:  # noqa: BLE001
            record["correctness"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"correctness (equal greedy texts, tiny fp32): {record['correctness']}", flush=True)
        save()
    fast = next((v for v in variants if v != "plain"), None)
    if fast and not args.no_profile and time.perf_counter() < deadline:
        # last, after everything is saved: profiling CUDA-graph replays is the riskiest step
        try:
            engine, call = engine_variant(model, processor, args, max(batches), inductor=(fast == "inductor"))
            record["profile"] = {"variant": fast}
            for b in (min(batches), max(batches)):
                reqs = requests_for(imgs[:b])
                call(reqs)  # warm-up: capture graphs for this batch bucket
                record["profile"][b] = profile_call(call, reqs, device, out_dir / f"{stem}-profile-b{b}.txt")
            engine._fast.reset()
        except Exception as exc:  # noqa: BLE001
            record["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        save()

    record["total_s"] = time.perf_counter() - t_start
    save()
    print()
    print(markdown(record))
    print(f"wrote {out_dir / stem}.json and .md in {record['total_s']:.0f} s")
    return 0


def run_vllm(record: dict, model, processor, args, batches: list[int], imgs, device, deadline: float) -> None:
    """vLLM's offline LLM timed like the other variants, then the project's VLLMEngine checked;
    both on a config-only checkpoint with vLLM's dummy (random) weights."""
    import shutil
    import tempfile

    try:
        import gpu_vllm
        import vllm
    except ImportError as exc:
        record["results"]["vllm"] = {"batches": {}, "error": f"vLLM not importable: {exc}"}
        return
    folder = gpu_vllm.write_dummy_checkpoint(model, processor, Path(tempfile.mkdtemp(prefix="egm-vllm-ckpt-")))
    record["vllm_version"] = vllm.__version__
    gc.collect()
    torch.cuda.empty_cache()
    try:
        t0 = time.perf_counter()
        call, llm, startup = gpu_vllm.offline_call(folder, max(batches), args.new_tokens, args.min_pixels,
                                                   args.max_pixels)
        print(f"[vllm] {vllm.__version__} LLM() ready in {startup:.0f} s", flush=True)
        res = run_variant("vllm", call, batches, imgs, args, device, deadline + 120)
        res["startup_s"] = startup
        record["results"]["vllm"] = res
        gpu_vllm.shutdown(llm)
        del call, llm
        print(f"[vllm] offline timing done in {time.perf_counter() - t0:.0f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - record it; the engine check may still run
        import traceback

        traceback.print_exc()
        record["results"].setdefault("vllm", {"batches": {}})["error"] = f"{type(exc).__name__}: {exc}"
    try:
        check = gpu_vllm.check_engine(folder, [im for im in imgs[:4]], [PROMPT.format(what=THINGS[0]),
                                      PROMPT.format(what=THINGS[1])], args.min_pixels, args.max_pixels)
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    record["vllm_engine_check"] = check
    print(f"[vllm] project VLLMEngine on real vLLM: {check}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)


def _phases_by_batch(phases: list[dict]) -> dict:
    out: dict = {}
    for p in phases:
        out[int(p.get("batch_size", 0))] = p  # the last call of each batch size
    return out


def _summarise(record: dict) -> None:
    res = record["results"]
    plain = res.get("plain", {}).get("batches", {})
    fast_names = [n for n in FAST if n in res]
    for b in record["batches"]:
        best = [res[n]["batches"][b]["images_per_s"] for n in fast_names if b in res[n]["batches"]]
        if b in plain and best:
            record["speedup"][b] = max(best) / plain[b]["images_per_s"]
    goals = {}
    big = max(record["batches"])
    if big in record["speedup"]:
        sp = record["speedup"][big]
        goals[f"batch-{big} speed-up >= 4x"] = f"{sp:.2f}x ({'met' if sp >= 4 else 'missed'})"
    lats = [res[n]["latency"]["p50_s"] for n in fast_names if res[n].get("latency")]
    if lats:
        goals["1 image < 1 s (p50)"] = f"{min(lats):.3f} s ({'met' if min(lats) < 1 else 'missed'})"
    ratios = [fast["median_s"] / record["floors"][b]["floor_s"] for b in record["batches"]
              if (fast := _best_fast(res, b)) and b in record["floors"]]
    if ratios:
        goals["fast path <= 1.5x the floor at every batch"] = (
            f"worst {max(ratios):.2f}x ({'met' if max(ratios) <= 1.5 else 'missed'})")
    record["goals"] = goals


if __name__ == "__main__":
    raise SystemExit(main())
