"""VLLMEngine with a stub ``vllm`` module (vLLM cannot run here).

The stub records what the engine hands to ``LLM`` / ``SamplingParams`` / ``generate`` and answers
like vLLM does: text without the end-of-turn token that stopped generation, per-step
``{token_id: Logprob}`` dicts whose ``decoded_token`` is the single token's string (U+FFFD for
halves of a multi-byte character). The tokenizer and chat template are the real tiny Qwen3-VL
ones from worker/tiny_model.py.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from PIL import Image

from egm.config.settings import Settings
from egm.worker.engines.base import DecodingConfig, EngineError, EngineRequest
from egm.worker.engines.vllm_engine import (
    INSTALL_HINT,
    VLLMEngine,
    VLLMOptions,
    completion_to_output,
    image_token_count,
    sampling_kwargs,
)
from egm.worker.tiny_model import build_tokenizer

try:  # generic checks shared by every engine, when that helper exists
    from tests.engine_conformance import check_engine_conformance
except ImportError:  # pragma: no cover - depends on another module's progress
    check_engine_conformance = None

MAX_PIXELS = 64 * 32 * 32
MIN_PIXELS = 4 * 32 * 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --- the stub vllm module ------------------------------------------------------------


@dataclass
class Logprob:
    logprob: float
    rank: int | None = 1
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.n = kwargs.get("n", 1)


def fake_answer(prompt_text: str, image: Image.Image) -> str:
    expression = re.search(r"<\|vision_end\|>(.*?)<\|im_end\|>", prompt_text, re.S).group(1)
    expression = re.sub(r"^Locate\s+|,\s*output.*$", "", expression, flags=re.S)
    return (f"The image is {image.width}x{image.height}; {expression} is on the left.\n</think>\n\n"
            f"```json\n[\n\t{{\"bbox_2d\": [10, 20, 300, 400], \"label\": \"{expression}\"}}\n]\n```")


@dataclass
class FakeLLM:
    """Records its construction and generate calls; ``reject`` makes a whole generate call raise
    when any prompt contains that text (as vLLM does when it refuses one request)."""

    kwargs: dict[str, Any]
    tokenizer: Any
    calls: list[tuple[list[dict[str, Any]], SamplingParams]] = field(default_factory=list)
    reject: str | None = None
    with_logprobs: bool = True

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def _complete(self, index: int, prompt: str, image: Image.Image) -> CompletionOutput:
        tok = self.tokenizer
        text = fake_answer(prompt, image)
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        steps = [{tid: Logprob(-0.05 * (i % 4) - 0.001 * index,
                               decoded_token=tok.convert_tokens_to_string([tok.convert_ids_to_tokens(tid)]))}
                 for i, tid in enumerate(ids)]
        return CompletionOutput(index=index, text=text, token_ids=ids, cumulative_logprob=None,
                                logprobs=steps if self.with_logprobs else None)

    def generate(self, prompts: list[dict[str, Any]], sampling_params: SamplingParams,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        self.calls.append((prompts, sampling_params))
        if self.reject and any(self.reject in p["prompt"] for p in prompts):
            raise ValueError(f"request rejected: contains {self.reject}")
        results = []
        mm = self.kwargs["mm_processor_kwargs"]
        for i, item in enumerate(prompts):
            image = item["multi_modal_data"]["image"]
            assert isinstance(image, Image.Image)
            prompt_ids = self.tokenizer.encode(item["prompt"], add_special_tokens=False)
            expanded = len(prompt_ids) - 1 + image_token_count(image.width, image.height, mm["min_pixels"],
                                                               mm["max_pixels"])
            outputs = [self._complete(k, item["prompt"], image) for k in range(sampling_params.n)]
            results.append(RequestOutput(str(i), item["prompt"], list(range(expanded)), outputs))
        return results


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer):
    module = types.ModuleType("vllm")
    module.instances = []

    def make_llm(**kwargs: Any) -> FakeLLM:
        llm = FakeLLM(kwargs=kwargs, tokenizer=tokenizer)
        module.instances.append(llm)
        return llm

    module.LLM = make_llm
    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def make_engine(decoding: DecodingConfig | None = None, max_model_len: int = 8192, **kwargs: Any) -> VLLMEngine:
    return VLLMEngine("/models/egm-4b", decoding or DecodingConfig(), max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                      options=VLLMOptions(max_model_len=max_model_len), **kwargs)


def requests_for(*prompts: str, size: tuple[int, int] = (256, 192)) -> list[EngineRequest]:
    return [EngineRequest(image=Image.new("RGB", size, (40 * i, 90, 160)), prompt=p, request_id=str(i))
            for i, p in enumerate(prompts)]


def prompt(expression: str) -> str:
    return f"Locate {expression}, output its bbox coordinates using JSON format"


# --- tests ---------------------------------------------------------------------------


def test_llm_is_built_from_settings(fake_vllm):
    settings = Settings(model_dir="/models/egm-8b", vllm_gpu_memory_utilization=0.7, vllm_max_model_len=4096,
                        vllm_tensor_parallel_size=2, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    engine = VLLMEngine.from_settings(settings)
    assert fake_vllm.instances[0].kwargs == {
        "model": "/models/egm-8b",
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"max_pixels": MAX_PIXELS, "min_pixels": MIN_PIXELS},
        "max_model_len": 4096,
        "gpu_memory_utilization": 0.7,
        "tensor_parallel_size": 2,
        "enable_prefix_caching": True,
        "trust_remote_code": False,
        "runner": "generate",
    }
    assert engine.describe()["max_model_len"] == 4096


def test_sampling_params_are_greedy_by_default(fake_vllm):
    engine = make_engine()
    assert engine.sampling.kwargs == {
        "n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 20, "max_tokens": 1024, "logprobs": 0,
        "skip_special_tokens": False, "spaces_between_special_tokens": False,
    }


def test_batch_goes_to_one_generate_call_with_chat_template_and_image(fake_vllm):
    engine = make_engine()
    requests = requests_for(prompt("the red car"), prompt("the blue shirt"))
    outputs = engine.generate(requests)
    llm = fake_vllm.instances[0]
    assert len(llm.calls) == 1
    sent, params = llm.calls[0]
    assert params is engine.sampling
    for req, item in zip(requests, sent):
        assert item["prompt"] == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                                  f"{req.prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n")
        image = item["multi_modal_data"]["image"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == req.image.size
    assert [o.error for o in outputs] == [None, None]
    assert "the red car is on the left" in outputs[0].text and "the blue shirt" in outputs[1].text


def test_outputs_carry_tokens_logprobs_and_prompt_length(fake_vllm, tokenizer):
    engine = make_engine()
    requests = requests_for(prompt("the red car"), size=(256, 224))
    out = engine.generate(requests)[0]
    assert out.text.startswith("The image is 256x224;") and "\n</think>\n\n```json" in out.text
    assert not out.text.endswith("<|im_end|>")
    assert out.tokens is not None and "".join(out.tokens) == out.text
    # the end-of-turn token is scored but not part of the text: dropped
    assert len(out.tokens) == len(tokenizer.encode(out.text, add_special_tokens=False))
    assert out.logprobs == [pytest.approx(-0.05 * (i % 4)) for i in range(len(out.tokens))]
    prompt_text = fake_vllm.instances[0].calls[0][0][0]["prompt"]
    expected = len(tokenizer.encode(prompt_text, add_special_tokens=False)) - 1 + image_token_count(
        256, 224, MIN_PIXELS, MAX_PIXELS)
    assert out.prompt_tokens == expected
    assert out.extra["finish_reason"] == "stop"


def test_multibyte_characters_keep_tokens_aligned(fake_vllm):
    engine = make_engine()
    requests = requests_for(prompt("the café sign 标志"))
    out = engine.generate(requests)[0]
    assert out.error is None and "the café sign 标志 is on the left" in out.text
    assert out.tokens is not None and "".join(out.tokens) == out.text
    assert "\ufffd" not in "".join(out.tokens)
    assert all(lp <= 0 for lp in out.logprobs)


def test_too_long_prompt_fails_alone_before_generate(fake_vllm):
    engine = make_engine(max_model_len=200)
    requests = requests_for(prompt("the dog"), prompt("the dog " + "and the cat " * 60), prompt("the cat"),
                            size=(128, 128))
    outputs = engine.generate(requests)
    assert outputs[0].error is None and outputs[2].error is None
    assert outputs[1].error and "context is 200" in outputs[1].error and "EGM_VLLM_MAX_MODEL_LEN" in outputs[1].error
    sent = fake_vllm.instances[0].calls[0][0]
    assert len(sent) == 2  # the long prompt never reached vLLM
    assert "the cat" in outputs[2].text


def test_large_image_is_downscaled_before_vllm(fake_vllm):
    engine = make_engine()
    engine.generate(requests_for(prompt("the sky"), size=(4000, 3000)))
    image = fake_vllm.instances[0].calls[0][0][0]["multi_modal_data"]["image"]
    assert image.width * image.height <= MAX_PIXELS
    assert abs(image.width / image.height - 4 / 3) < 0.02


def test_broken_and_elongated_images_fail_alone(fake_vllm):
    engine = make_engine()
    requests = requests_for(prompt("a"), prompt("b"), prompt("c"))
    requests[0].image = Image.new("RGB", (0, 0))
    requests[1].image = Image.new("RGB", (4000, 10))
    outputs = engine.generate(requests)
    assert outputs[0].error and "cannot prepare request" in outputs[0].error
    assert outputs[1].error and "aspect ratio" in outputs[1].error
    assert outputs[2].error is None and "c is on the left" in outputs[2].text


def test_request_rejected_by_vllm_fails_alone(fake_vllm):
    engine = make_engine()
    fake_vllm.instances[0].reject = "POISON"
    outputs = engine.generate(requests_for(prompt("the dog"), prompt("POISON"), prompt("the cat")))
    assert outputs[1].error and "request rejected" in outputs[1].error
    assert outputs[0].error is None and outputs[2].error is None
    assert [len(call[0]) for call in fake_vllm.instances[0].calls] == [3, 1, 1, 1]


def test_whole_batch_failure_raises(fake_vllm):
    engine = make_engine()
    fake_vllm.instances[0].reject = "POISON"
    with pytest.raises(EngineError, match="whole batch"):
        engine.generate(requests_for(prompt("POISON one"), prompt("POISON two")))


def test_sampling_asks_one_answer_per_request(fake_vllm):
    """K samples are K requests made by the pipeline, not the engine's ``n``."""
    engine = make_engine(DecodingConfig(temperature=0.7))
    assert engine.sampling.kwargs["n"] == 1 and engine.sampling.kwargs["temperature"] == 0.7
    out = engine.generate(requests_for(prompt("the dog")))[0]
    assert "samples" not in out.extra and "".join(out.tokens) == out.text


def test_missing_logprobs_leave_tokens_empty(fake_vllm):
    engine = make_engine()
    fake_vllm.instances[0].with_logprobs = False
    out = engine.generate(requests_for(prompt("the dog")))[0]
    assert out.error is None and "</think>" in out.text
    assert out.tokens is None and out.logprobs is None


def test_chat_template_without_image_placeholder_is_refused(fake_vllm, tokenizer):
    original = tokenizer.chat_template  # keep the real tokenizer; swap only its template
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    try:
        with pytest.raises(EngineError, match="image_pad"):
            make_engine()
    finally:
        tokenizer.chat_template = original


def test_missing_vllm_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError) as info:
        make_engine()
    assert INSTALL_HINT in str(info.value)
    assert isinstance(info.value, EngineError)


def test_empty_batch(fake_vllm):
    engine = make_engine()
    assert engine.generate([]) == []
    assert fake_vllm.instances[0].calls == []


def test_served_model_is_the_folder_vllm_loaded_and_its_runtime(fake_vllm, tmp_path):
    folder = tmp_path / "EGM-4B-w12"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    fake_vllm.__version__ = "0.99.1"
    engine = VLLMEngine(str(folder), DecodingConfig(), max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    served = engine.served_model()
    assert (served.name, served.checkpoint) == ("EGM-4B-w12", str(folder.resolve()))
    assert served.runtime["library"] == "vllm" and served.runtime["version"] == "0.99.1"


def test_close_releases_the_model(fake_vllm):
    engine = make_engine()
    engine.close()
    assert engine.llm is None


@pytest.mark.skipif(check_engine_conformance is None, reason="tests/engine_conformance.py not available")
def test_generic_conformance_helper(fake_vllm):
    check_engine_conformance(make_engine())


# --- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("size,tokens", [((1024, 768), 768), ((1920, 1080), 2040), ((4000, 3000), 11750)])
def test_image_token_count_matches_qwen3_vl(size, tokens):
    assert image_token_count(*size, min_pixels=784, max_pixels=16384 * 32 * 32) == tokens


def test_image_token_count_respects_pixel_bounds():
    assert image_token_count(4000, 3000, 784, MAX_PIXELS) <= MAX_PIXELS // 1024
    assert image_token_count(10, 10, MIN_PIXELS, MAX_PIXELS) >= MIN_PIXELS // 1024


def test_sampling_kwargs_top_k_off():
    assert sampling_kwargs(DecodingConfig(top_k=-1))["top_k"] == 0


def test_completion_without_matching_pieces_drops_logprobs():
    completion = CompletionOutput(index=0, text="abc", token_ids=[1, 2], cumulative_logprob=None,
                                  logprobs=[{1: Logprob(-0.1, decoded_token="x")}, {2: Logprob(-0.2, decoded_token="y")}])
    out = completion_to_output(completion)
    assert out.text == "abc" and out.tokens is None and out.logprobs is None


def test_llm_is_asked_to_generate_whatever_the_config_says() -> None:
    """Seen on the GPU with vLLM 0.24: a checkpoint whose config has no `architectures` was taken
    for an embedding model (`--runner auto` -> pooling) and every generate call failed."""
    from egm.worker.engines.vllm_engine import VLLMOptions, llm_kwargs

    assert llm_kwargs("/m", VLLMOptions(), 1000, 10)["runner"] == "generate"
