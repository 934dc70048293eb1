"""Pausing a batch for another (issue 13, item 7), engine side: the tiny random Qwen3-VL on the CPU.

While the fast path decodes a batch it offers pauses (``between_steps``); a batch run in a pause
must not change the paused batch's tokens or log-probs, and must give what it gives alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.model import TEST_MAX_PIXELS, TEST_MIN_PIXELS
from egm.worker.engines import hf_fast
from egm.worker.engines.base import DecodingConfig, EngineRequest
from egm.worker.engines.hf import HFEngine
from egm.worker.engines.scripted import ScriptedEngine

PROMPT = "Locate the {}, output its bbox coordinates using JSON format"


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def requests_() -> list[EngineRequest]:
    sizes = [(120, 90), (48, 160), (200, 200), (64, 64)]
    things = ["red car", "dog", "tall man", "cup"]
    return [EngineRequest(noise(w, h, seed=10 + i), PROMPT.format(t), f"r{i}")
            for i, ((w, h), t) in enumerate(zip(sizes, things, strict=True))]


@pytest.fixture()
def engine(tiny_random_model_dir: Path, monkeypatch) -> HFEngine:
    # a pause after every text layer of the prefill, so the tiny model's few layers offer some
    monkeypatch.setattr(hf_fast, "PREFILL_CHECK_EVERY", 1)
    return HFEngine(str(tiny_random_model_dir), DecodingConfig(max_new_tokens=24), TEST_MAX_PIXELS,
                    TEST_MIN_PIXELS, device="cpu", compile=True, batch_size=4, ignore_eos=True)


def answers(outputs) -> list[tuple[list[str], list[float]]]:
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    return [(o.tokens, o.logprobs) for o in outputs]


@pytest.mark.parametrize("outer,inner", [((0, 1, 2), (3,)), ((0,), (3,)), ((0, 1), (2, 3))],
                         ids=["other-bucket", "same-bucket", "same-bucket-of-2"])
def test_a_batch_run_in_every_pause_changes_neither_batch(engine, requests_, outer, inner) -> None:
    outer_reqs = [requests_[i] for i in outer]
    inner_reqs = [requests_[i] for i in inner]
    outer_alone, inner_alone = answers(engine.generate(outer_reqs)), answers(engine.generate(inner_reqs))
    decoder = engine._fast
    during: list = []
    paused_ws: list = []

    def pause() -> None:
        if decoder._active:  # the first pause comes before the chunk, outside the decoder
            paused_ws.append(decoder._workspaces[decoder._active[0]])
        during.append(answers(engine.generate(inner_reqs)))

    assert answers(engine.generate(outer_reqs, between_steps=pause)) == outer_alone
    # before the chunk, before the prefill, after each text layer but the last, every 8 decode steps
    layers = engine.model.config.text_config.num_hidden_layers
    assert len(during) == 1 + 1 + (layers - 1) + 24 // hf_fast.FINISH_CHECK_EVERY
    assert all(d == inner_alone for d in during)
    # the paused batch kept its workspace (the same buffers) through every pause
    assert len(paused_ws) == len(during) - 1 and all(ws is paused_ws[0] for ws in paused_ws)
    assert not decoder._active


def test_the_paused_workspace_is_never_evicted(engine, requests_) -> None:
    decoder = engine._fast
    decoder.reset()
    decoder._max_workspaces = 1
    outer_alone = answers(engine.generate(requests_[:3]))
    seen: list[int] = []

    def pause() -> None:
        engine.generate(requests_[3:])  # bucket 1 while bucket 4 is paused: two workspaces, limit 1
        seen.append(len(decoder._workspaces))

    assert answers(engine.generate(requests_[:3], between_steps=pause)) == outer_alone
    assert seen and max(seen) == 2
    engine.generate(requests_[3:])  # nothing paused now: the limit applies again
    assert len(decoder._workspaces) == 1


def test_a_batch_run_in_a_pause_does_not_pause_and_nesting_stops_at_one_level(engine, requests_) -> None:
    inner_pauses: list[int] = []

    def inner_pause() -> None:
        inner_pauses.append(1)

    def pause() -> None:
        engine.generate(requests_[3:], between_steps=inner_pause)

    engine.generate(requests_[:1], between_steps=pause)
    assert inner_pauses == []
    decoder = engine._fast
    decoder._active = [(1, 0), (1, 1)]  # as inside a pause's batch
    try:
        enc = engine._encode([engine._prepare(0, requests_[0])])
        with pytest.raises(RuntimeError, match="nested"):
            decoder.generate(enc)
    finally:
        decoder._active = []


def test_a_failing_pause_ends_the_pauses_not_the_batch(engine, requests_) -> None:
    alone = answers(engine.generate(requests_[:2]))
    calls: list[int] = []

    def pause() -> None:
        calls.append(1)
        raise ConnectionError("redis went away")

    assert answers(engine.generate(requests_[:2], between_steps=pause)) == alone
    assert len(calls) == 2  # once before the chunk (logged), once in the decoder, which then stops asking


def test_engines_say_whether_they_pause() -> None:
    from egm.worker.engines.openai_compat import OpenAICompatEngine
    from egm.worker.engines.vllm_engine import VLLMEngine

    assert HFEngine.pauses and ScriptedEngine.pauses
    assert not VLLMEngine.pauses and not OpenAICompatEngine.pauses


def test_the_scripted_engine_pauses_during_its_simulated_gpu_time(requests_) -> None:
    engine = ScriptedEngine(delay_s=0.3)
    inner: list = []
    out = engine.generate(requests_[:2], between_steps=lambda: inner.append(engine.generate(requests_[2:3])))
    assert len(inner) >= 2 and all(len(i) == 1 and i[0].text for i in inner)
    assert [o.text for o in out] == [o.text for o in ScriptedEngine().generate(requests_[:2])]


def test_the_vision_tower_runs_in_chunks_with_pauses_between(engine, requests_, monkeypatch) -> None:
    """With a hook the vision tower runs VISION_CHUNK images at a time (here 1): a pause after each
    chunk, the paused batch's answers identical whether or not a batch ran in those pauses, and the
    same as the unchunked tower's."""
    monkeypatch.setattr(hf_fast, "VISION_CHUNK", 1)
    outer, inner = requests_[:3], requests_[3:]
    unchunked = answers(engine.generate(outer))
    quiet_pauses: list[int] = []
    chunked = answers(engine.generate(outer, between_steps=lambda: quiet_pauses.append(1)))
    busy: list = []
    preempted = answers(engine.generate(outer, between_steps=lambda: busy.append(answers(engine.generate(inner)))))
    layers = engine.model.config.text_config.num_hidden_layers
    assert len(quiet_pauses) == len(busy) == 1 + 1 + 3 + (layers - 1) + 24 // hf_fast.FINISH_CHECK_EVERY
    assert preempted == chunked  # exactly: nothing run in a pause changes the paused batch
    assert [t for t, _ in chunked] == [t for t, _ in unchunked]
    for (_, a), (_, b) in zip(chunked, unchunked):
        assert np.allclose(a, b, atol=1e-5)
    assert all(b == answers(engine.generate(inner)) for b in busy)
