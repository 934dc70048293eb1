"""OpenAICompatEngine against a real local OpenAI-compatible HTTP server (tests/openai_test_server.py)."""

from __future__ import annotations

import logging
import math

import pytest
from PIL import Image

from egm.processes import free_port
from tests.openai_test_server import OpenAITestServer, ServerBehavior
from egm.worker.engines.base import DecodingConfig, EngineError, EngineRequest
from egm.worker.engines.served import align_pieces, fit_within_pixels, fitted_size, join_reasoning
from egm.worker.engines.openai_compat import OpenAICompatEngine, normalize_base_url, parse_chat_response

try:  # generic checks shared by every engine, when that helper exists
    from tests.engine_conformance import check_engine_conformance
except ImportError:  # pragma: no cover - depends on another module's progress
    check_engine_conformance = None

SECRET = "sk-test-very-secret-0123456789"
MAX_PIXELS = 64 * 64 * 4


def make_requests(n: int, size: tuple[int, int] = (96, 64)) -> list[EngineRequest]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    return [EngineRequest(image=Image.new("RGB", size, colors[i % len(colors)]),
                          prompt=f"Locate object number {i}, output its bbox coordinates using JSON format",
                          request_id=f"r{i}") for i in range(n)]


@pytest.fixture
def server():
    with OpenAITestServer(ServerBehavior()) as srv:
        yield srv


def make_engine(base_url: str, **kwargs) -> OpenAICompatEngine:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 10)
    engine = OpenAICompatEngine(base_url, DecodingConfig(), max_pixels=kwargs.pop("max_pixels", MAX_PIXELS), **kwargs)
    return engine


def assert_conformant(requests, outputs) -> None:
    assert len(outputs) == len(requests)
    for req, out in zip(requests, outputs):
        assert out.error is None, out.error
        assert req.prompt in out.text  # the server echoes the prompt: proves order
        assert "</think>" in out.text and '"bbox_2d": [100, 200, 300, 400]' in out.text
        assert out.tokens is not None and out.logprobs is not None
        assert "".join(out.tokens) == out.text
        assert len(out.tokens) == len(out.logprobs)
        assert all(lp <= 0 for lp in out.logprobs)
        assert out.prompt_tokens is not None and out.prompt_tokens > 0


def test_conformance_order_tokens_and_request_shape(server):
    engine = make_engine(server.base_url, concurrency=4)
    requests = make_requests(10)
    outputs = engine.generate(requests)
    engine.close()
    assert_conformant(requests, outputs)
    assert server.stats.invalid == []
    assert server.stats.model_calls == 1  # discovered once
    sent = server.stats.requests
    assert len(sent) == 10
    for body in sent:
        assert body["model"] == "egm-test"
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["top_k"] == 20
        assert body["max_tokens"] == 1024
        assert body["logprobs"] is True and body["top_logprobs"] == 0
        assert body["image_format"] == "JPEG"
        assert "n" not in body
    assert engine.describe()["model"] == "egm-test"


@pytest.mark.skipif(check_engine_conformance is None, reason="tests/engine_conformance.py not available")
def test_generic_conformance_helper(server):
    engine = make_engine(server.base_url)
    try:
        check_engine_conformance(engine)
    finally:
        engine.close()


def test_model_discovered_once_across_batches(server):
    engine = make_engine(server.base_url)
    engine.generate(make_requests(2))
    engine.generate(make_requests(3))
    engine.close()
    assert server.stats.model_calls == 1
    assert server.stats.chat_calls == 5


def test_explicit_model_skips_discovery(server):
    server.behavior.model = "served-name"
    engine = make_engine(server.base_url, model="served-name")
    outputs = engine.generate(make_requests(1))
    engine.close()
    assert outputs[0].error is None
    assert server.stats.model_calls == 0
    assert server.stats.requests[0]["model"] == "served-name"


def test_concurrency_is_bounded(server):
    # every call waits until 3 calls are in flight: the bound is reached but never exceeded
    server.behavior.hold_until_in_flight = 3
    engine = make_engine(server.base_url, concurrency=3)
    requests = make_requests(9)
    outputs = engine.generate(requests)
    engine.close()
    assert_conformant(requests, outputs)
    assert server.stats.max_in_flight == 3


@pytest.mark.parametrize("fault", [
    {"fail_first": 2, "fail_status": 500},
    {"fail_first": 2, "fail_status": 503},
    {"fail_first": 2, "fail_status": 429},
    {"drop_first": 2},
    {"malformed_first": 2},
])
def test_retries_then_success(server, fault):
    for key, value in fault.items():
        setattr(server.behavior, key, value)
    engine = make_engine(server.base_url, concurrency=1, retries=3)
    requests = make_requests(3)
    outputs = engine.generate(requests)
    engine.close()
    assert_conformant(requests, outputs)
    assert server.stats.chat_calls == 5  # 2 failed attempts + 3 successes


def test_retries_exhausted_is_a_request_error(server):
    server.behavior.fail_first = 100
    engine = make_engine(server.base_url, concurrency=2, retries=2)
    outputs = engine.generate(make_requests(2))
    engine.close()
    assert all(o.error and "HTTP 500" in o.error for o in outputs)
    assert server.stats.chat_calls == 6  # 3 attempts each


def test_client_errors_are_not_retried(server):
    server.behavior.fail_prompts = {"number 1": 400}
    engine = make_engine(server.base_url, retries=3)
    outputs = engine.generate(make_requests(2))
    engine.close()
    assert outputs[0].error is None
    assert outputs[1].error and "HTTP 400" in outputs[1].error
    assert server.stats.chat_calls == 2


def test_persistent_500_fails_only_that_request_and_hides_the_key(server, caplog):
    server.behavior.api_key = SECRET
    server.behavior.fail_prompts = {"number 2": 500}  # the error body echoes the Authorization header
    engine = make_engine(server.base_url, api_key=SECRET, retries=2, concurrency=4)
    requests = make_requests(5)
    with caplog.at_level(logging.DEBUG):
        outputs = engine.generate(requests)
    engine.close()
    bad = outputs[2]
    assert bad.error and "HTTP 500" in bad.error and "failed for number 2" in bad.error
    assert SECRET not in bad.error and "***" in bad.error
    good = [o for i, o in enumerate(outputs) if i != 2]
    assert_conformant([r for i, r in enumerate(requests) if i != 2], good)
    assert SECRET not in caplog.text
    assert "retry" in caplog.text  # the retries were logged, redacted


def test_api_key_sent_as_bearer(server):
    server.behavior.api_key = SECRET
    engine = make_engine(server.base_url, api_key=SECRET)
    outputs = engine.generate(make_requests(2))
    engine.close()
    assert all(o.error is None for o in outputs)
    assert server.stats.auth_headers == [f"Bearer {SECRET}"] * 2
    assert SECRET not in repr(engine.describe())


def test_wrong_api_key_error_does_not_leak_key(server):
    server.behavior.api_key = "the-right-key"
    engine = make_engine(server.base_url, api_key=SECRET, model="egm-test")
    outputs = engine.generate(make_requests(2))
    engine.close()
    for out in outputs:
        assert out.error and "HTTP 401" in out.error
        assert SECRET not in out.error


def test_discovery_failure_raises_without_key(server):
    server.behavior.api_key = "the-right-key"
    engine = make_engine(server.base_url, api_key=SECRET)
    with pytest.raises(EngineError) as info:
        engine.generate(make_requests(1))
    engine.close()
    assert "401" in str(info.value) and SECRET not in str(info.value)


@pytest.mark.parametrize("model", [None, "egm-test"])
def test_unreachable_server_raises_engine_error(model):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    engine = make_engine(url, model=model, retries=1, api_key=SECRET)
    with pytest.raises(EngineError) as info:
        engine.generate(make_requests(3))
    engine.close()
    assert "127.0.0.1" in str(info.value)
    assert SECRET not in str(info.value)


def test_timeout_becomes_request_error(server):
    server.behavior.fail_prompts = {}
    server.behavior.delay_s = 1.0
    engine = make_engine(server.base_url, model="egm-test", timeout_s=0.2, retries=2)
    outputs = engine.generate(make_requests(1))
    engine.close()
    assert outputs[0].error and "no answer within 0.2 s" in outputs[0].error
    assert server.stats.chat_calls == 1  # a timed-out generation is not repeated


def test_reasoning_content_split_is_rejoined(server):
    server.behavior.reasoning_split = True
    engine = make_engine(server.base_url)
    requests = make_requests(3)
    outputs = engine.generate(requests)
    engine.close()
    assert_conformant(requests, outputs)
    for out in outputs:
        reasoning, _, answer = out.text.partition("\n</think>\n\n")
        assert reasoning.startswith("Received image") and answer.startswith("```json")


def test_reasoning_split_without_logprobs(server):
    server.behavior.reasoning_split = True
    server.behavior.include_logprobs = False
    engine = make_engine(server.base_url)
    out = engine.generate(make_requests(1))[0]
    engine.close()
    assert out.error is None and out.tokens is None and out.logprobs is None
    assert out.text.startswith("Received image 96x64") and "\n</think>\n\n```json" in out.text


def test_scored_end_token_is_dropped_from_tokens(server):
    server.behavior.trailing_eos = True
    engine = make_engine(server.base_url)
    requests = make_requests(2)
    outputs = engine.generate(requests)
    engine.close()
    assert_conformant(requests, outputs)
    assert all(not o.text.endswith("<|im_end|>") for o in outputs)


def test_multibyte_characters_split_over_tokens(server):
    engine = make_engine(server.base_url)
    requests = [EngineRequest(image=Image.new("RGB", (64, 64)), prompt="Locate the café sign 标志, output its bbox")]
    out = engine.generate(requests)[0]
    engine.close()
    assert_conformant(requests, [out])
    assert "café sign 标志" in "".join(out.tokens)
    assert "\ufffd" not in out.text


def test_large_image_is_downscaled_to_the_cap(server):
    engine = make_engine(server.base_url, max_pixels=200_000)
    requests = [EngineRequest(image=Image.new("RGB", (4000, 3000), (10, 20, 30)), prompt="Locate the sky"),
                EngineRequest(image=Image.new("RGBA", (64, 48), (10, 20, 30, 0)), prompt="Locate the dot")]
    outputs = engine.generate(requests)
    engine.close()
    assert all(o.error is None for o in outputs)
    (w, h), small = server.stats.requests[0]["image_size"], server.stats.requests[1]["image_size"]
    if server.stats.requests[0]["prompt"] != "Locate the sky":
        (w, h), small = small, (w, h)
    assert w * h <= 200_000 and w * h > 0.98 * 200_000  # as large as the cap allows
    assert abs(w / h - 4 / 3) < 0.01
    assert small == (64, 48)  # small images are not upscaled
    assert f"Received image {w}x{h}" in outputs[0].text


def test_broken_image_fails_only_its_request(server):
    engine = make_engine(server.base_url)
    requests = make_requests(2)
    requests[0].image = Image.new("RGB", (0, 0))
    outputs = engine.generate(requests)
    engine.close()
    assert outputs[0].error and "cannot encode image" in outputs[0].error
    assert outputs[1].error is None


def test_sampling_asks_one_answer_per_request(server):
    """K samples are K requests made by the pipeline, not the API's ``n``."""
    engine = OpenAICompatEngine(server.base_url, DecodingConfig(temperature=0.7, top_k=0), max_pixels=MAX_PIXELS)
    out = engine.generate(make_requests(1))[0]
    engine.close()
    body = server.stats.requests[0]
    assert "n" not in body and body["temperature"] == 0.7 and "top_k" not in body
    assert "samples" not in out.extra and "".join(out.tokens) == out.text


def test_empty_batch_makes_no_calls(server):
    engine = make_engine(server.base_url)
    assert engine.generate([]) == []
    engine.close()
    assert server.stats.model_calls == 0 and server.stats.chat_calls == 0


# --- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("url,expected", [
    ("http://h:8000", "http://h:8000/v1"),
    ("http://h:8000/", "http://h:8000/v1"),
    ("http://h:8000/v1/", "http://h:8000/v1"),
    ("https://proxy.example/openai/v1", "https://proxy.example/openai/v1"),
])
def test_normalize_base_url(url, expected):
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize("size,cap", [((4000, 3000), 200_000), ((7, 5000), 1000), ((1920, 1080), 1_003_520),
                                      ((10, 10), 50)])
def test_fitted_size_respects_cap_and_aspect(size, cap):
    w, h = fitted_size(*size, cap)
    assert 1 <= w * h <= cap
    assert w <= size[0] and h <= size[1]
    if min(w, h) > 20:
        assert math.isclose(w / h, size[0] / size[1], rel_tol=0.02)


def test_fit_within_pixels_leaves_small_images_alone():
    image = Image.new("RGB", (30, 20))
    assert fit_within_pixels(image, 10_000) is image


def test_join_reasoning():
    assert join_reasoning("why\n", "\n\nanswer") == "why\n</think>\n\nanswer"
    assert join_reasoning(None, "answer") == "answer"
    assert join_reasoning("cut short", None) == "cut short"


def test_align_pieces_rejects_unrelated_tokens():
    assert align_pieces("abc", ["x", "y"], [-0.1, -0.2]) is None
    assert align_pieces("abc", ["a", "b"], [-0.1]) is None
    assert align_pieces("ab", ["a", "b", "<eos>"], [-0.1, -0.2, 0.0]) == ("ab", ["a", "b"], [-0.1, -0.2])


def test_parse_chat_response_rejects_garbage():
    from egm.worker.engines.openai_compat import ResponseFormatError

    for data in ([], {"choices": []}, {"choices": [{"message": None}]}):
        with pytest.raises(ResponseFormatError):
            parse_chat_response(data)
