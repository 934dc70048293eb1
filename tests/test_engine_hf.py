"""The transformers engine on the tiny random Qwen3-VL, on the CPU: plain and fast paths."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.engine_conformance import check_engine_conformance, check_output
from tests.fixtures.model import TEST_MAX_PIXELS, TEST_MIN_PIXELS
from egm.worker.engines.base import DecodingConfig, EngineError, EngineRequest
from egm.worker.engines.hf import HFEngine, visual_tokens

PROMPT = "Locate the {}, output its bbox coordinates using JSON format"


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def three_requests() -> list[EngineRequest]:
    sizes = [(120, 90), (48, 160), (200, 200)]  # three different visual-token counts
    return [EngineRequest(noise(w, h, seed=i), PROMPT.format(thing), f"r{i}")
            for i, ((w, h), thing) in enumerate(zip(sizes, ["red car", "dog", "tall man"], strict=True))]


@pytest.fixture(scope="module")
def plain_outputs(hf_engine, three_requests):
    return hf_engine.generate(three_requests)


def test_conformance_plain(hf_engine) -> None:
    check_engine_conformance(hf_engine, deterministic=True)


def test_conformance_fast(hf_engine_fast) -> None:
    check_engine_conformance(hf_engine_fast, deterministic=True)


def test_batch_outputs_are_well_formed(plain_outputs, three_requests) -> None:
    assert len(plain_outputs) == len(three_requests)
    for out in plain_outputs:
        check_output(out)
        assert out.text, "the random model always says something within 24 tokens"
        assert len(out.tokens) == len(out.logprobs) <= 24
        assert all(math.isfinite(lp) and lp <= 0.0 for lp in out.logprobs)
    # bigger images -> more visual tokens in the prompt, so outputs are not shuffled
    prompt_tokens = [o.prompt_tokens for o in plain_outputs]
    assert len(set(prompt_tokens)) == 3, prompt_tokens


def test_batched_equals_one_by_one(hf_engine, plain_outputs, three_requests) -> None:
    alone = [hf_engine.generate([r])[0] for r in three_requests]
    assert [o.text for o in alone] == [o.text for o in plain_outputs]
    assert [o.prompt_tokens for o in alone] == [o.prompt_tokens for o in plain_outputs]
    for a, b in zip(alone, plain_outputs, strict=True):
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_outputs_depend_on_the_image(plain_outputs) -> None:
    texts = [o.text for o in plain_outputs]
    assert len(set(texts)) > 1, texts


def test_greedy_is_deterministic(hf_engine, three_requests) -> None:
    first = hf_engine.generate([three_requests[0]])[0]
    second = hf_engine.generate([three_requests[0]])[0]
    assert first.text == second.text
    assert first.logprobs == second.logprobs


def test_fast_path_equals_plain_generate(hf_engine_fast, plain_outputs, three_requests) -> None:
    fast = hf_engine_fast.generate(three_requests)
    assert [o.text for o in fast] == [o.text for o in plain_outputs]
    assert [o.tokens for o in fast] == [o.tokens for o in plain_outputs]
    for f, p in zip(fast, plain_outputs, strict=True):
        assert np.allclose(f.logprobs, p.logprobs, atol=1e-4)
    assert hf_engine_fast.describe()["decode_path"].startswith("static-cache")
    assert hf_engine_fast.describe()["decode_path"] == "static-cache", "no CUDA graphs or Inductor on the CPU"


def test_chunks_and_size_sorting_keep_request_order(hf_engine_fast, hf_engine) -> None:
    # six requests, engine batch size 4: two chunks, with images sorted by size across them
    reqs = [EngineRequest(noise(40 + 23 * i, 150 - 17 * i, seed=10 + i), PROMPT.format(f"thing {i}"))
            for i in range(6)]
    batched = hf_engine_fast.generate(reqs)
    alone = [hf_engine.generate([r])[0] for r in reqs]
    assert [o.text for o in batched] == [o.text for o in alone]


def test_bad_requests_fail_alone(hf_engine, plain_outputs, three_requests) -> None:
    bad = [
        EngineRequest(Image.new("RGB", (0, 0)), PROMPT.format("void")),
        EngineRequest(Image.new("RGB", (1, 400)), PROMPT.format("needle")),  # aspect ratio > 200
        EngineRequest("not an image", PROMPT.format("ghost")),  # type: ignore[arg-type]
        EngineRequest(noise(64, 64, seed=3), "   "),
    ]
    mixed = [three_requests[0], bad[0], three_requests[1], bad[1], bad[2], three_requests[2], bad[3]]
    outs = hf_engine.generate(mixed)
    assert len(outs) == len(mixed)
    errors = [o.error for o in outs]
    assert [e is not None for e in errors] == [False, True, False, True, True, False, True]
    assert "zero size" in errors[1] and "aspect ratio" in errors[3] and "PIL image" in errors[4]
    assert [outs[i].text for i in (0, 2, 5)] == [o.text for o in plain_outputs]


def test_whole_batch_of_bad_inputs_still_returns_errors(hf_engine) -> None:
    outs = hf_engine.generate([EngineRequest(Image.new("RGB", (0, 5)), "x")])
    assert len(outs) == 1 and outs[0].error


def test_eos_stops_both_paths(tiny_random_model_dir: Path, hf_engine, three_requests) -> None:
    """Declare the 6th generated token an EOS: both paths must stop right before it."""
    import torch

    with torch.inference_mode():
        tokens, _ = hf_engine._generate_plain(hf_engine._encode([hf_engine._prepare(0, three_requests[0])]))
    ids = tokens[0].tolist()
    stop_at = ids.index(ids[5])  # first occurrence of that id
    assert stop_at > 0
    for compile in (False, True):
        engine = HFEngine(str(tiny_random_model_dir), DecodingConfig(max_new_tokens=24), TEST_MAX_PIXELS,
                          TEST_MIN_PIXELS, device="cpu", compile=compile)
        engine.model.generation_config.eos_token_id = [ids[5]]
        engine = HFEngine.from_model(engine.model, engine.processor, engine.decoding, TEST_MAX_PIXELS,
                                     TEST_MIN_PIXELS, compile=compile)
        assert ids[5] in engine.eos_ids
        out = engine.generate([three_requests[0]])[0]
        assert out.tokens == engine.decoder.pieces(ids[:stop_at]), compile
        assert len(out.logprobs) == stop_at


def test_sampling_runs_on_both_paths(tiny_random_model_dir: Path, three_requests) -> None:
    decoding = DecodingConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20)
    for compile in (False, True):
        engine = HFEngine(str(tiny_random_model_dir), decoding, TEST_MAX_PIXELS, TEST_MIN_PIXELS, device="cpu",
                          compile=compile)
        outs = engine.generate(three_requests)
        for out in outs:
            check_output(out)
            assert 0 < len(out.tokens) <= 12


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_random_model_dir: Path, three_requests) -> None:
    for compile in (False, True):
        engine = HFEngine(str(tiny_random_model_dir), DecodingConfig(max_new_tokens=9), TEST_MAX_PIXELS,
                          TEST_MIN_PIXELS, device="cpu", compile=compile, ignore_eos=True)
        assert [len(o.tokens) for o in engine.generate(three_requests)] == [9, 9, 9]


def test_unreachable_model_names_model_dir(tmp_path: Path) -> None:
    for path in (str(tmp_path / "no-such-checkpoint"), "nvidia/EGM-4B"):
        with pytest.raises(EngineError, match="MODEL_DIR"):
            HFEngine(path, DecodingConfig(), TEST_MAX_PIXELS, TEST_MIN_PIXELS, device="cpu")


def test_describe_names_the_path(hf_engine, hf_engine_fast) -> None:
    assert hf_engine.describe()["decode_path"] == "generate"
    assert hf_engine.describe()["engine"] == "hf"
    assert hf_engine_fast.describe()["compile"] is True


def test_visual_token_estimate_matches_the_processor(hf_engine) -> None:
    assert visual_tokens(640, 480, min_pixels=50176, max_pixels=1003520) == 300
    assert visual_tokens(4000, 3000, min_pixels=50176, max_pixels=1003520) <= 1003520 // 1024
    # the engine's own count (used to sort by size) is what the processor produces
    req = EngineRequest(noise(150, 90, seed=1), PROMPT.format("x"))
    prepared = hf_engine._prepare(0, req)
    enc = hf_engine._encode([prepared])
    image_id = hf_engine.model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == prepared.visual_tokens


def test_compiler_failure_falls_back_to_eager_code(tiny_random_model_dir: Path, plain_outputs, three_requests) -> None:
    engine = HFEngine(str(tiny_random_model_dir), DecodingConfig(max_new_tokens=24), TEST_MAX_PIXELS, TEST_MIN_PIXELS,
                      device="cpu", compile=True)
    fast = engine._fast

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Inductor failure")

    fast.inductor = True  # pretend the step was compiled, and make the "compiled" prefill fail
    fast._step_fn._prefill_layer = broken
    outs = engine.generate(three_requests)
    assert [o.text for o in outs] == [o.text for o in plain_outputs]
    assert fast.inductor is False
