"""Checks every engine must pass, whatever model or server sits behind it.

    from tests.engine_conformance import check_engine_conformance
    outputs = check_engine_conformance(engine)

It sends a batch of differently sized images with different prompts and one broken request
(a zero-size image) in the middle, and asserts the :class:`worker.engines.base.Engine`
contract: one output per request in order, the right types, aligned token pieces and
log-probs when given, and an error confined to the broken request. It returns the outputs
(broken request included) for engine-specific checks.
"""

from __future__ import annotations

import math

from PIL import Image

from egm.worker.engines.base import Engine, EngineOutput, EngineRequest, ServedModel

CONFORMANCE_SIZES = ((96, 64), (40, 120), (150, 150))
BROKEN_INDEX = 2


def conformance_requests() -> list[EngineRequest]:
    colours = ("red", "green", "blue")
    reqs = [
        EngineRequest(Image.new("RGB", size, colour), f"Locate the {colour} square, output its bbox coordinates "
                      "using JSON format", request_id=f"r{i}")
        for i, (size, colour) in enumerate(zip(CONFORMANCE_SIZES, colours, strict=True))
    ]
    reqs.insert(BROKEN_INDEX, EngineRequest(Image.new("RGB", (0, 0)), "Locate the void", request_id="broken"))
    return reqs


def check_output(out: EngineOutput) -> None:
    """One successful output is well formed."""
    assert isinstance(out, EngineOutput), type(out)
    assert out.error is None, out.error
    assert isinstance(out.text, str)
    if out.tokens is not None:
        assert all(isinstance(t, str) for t in out.tokens)
        assert "".join(out.tokens) == out.text, "token pieces must concatenate to the text"
    if out.logprobs is not None:
        assert out.tokens is not None and len(out.logprobs) == len(out.tokens)
        assert all(math.isfinite(lp) and lp <= 1e-6 for lp in out.logprobs), out.logprobs[:8]
    if out.prompt_tokens is not None:
        assert out.prompt_tokens > 0


def check_engine_conformance(engine: Engine, *, deterministic: bool = False) -> list[EngineOutput]:
    """``deterministic``: the engine answers a request the same alone as inside a batch
    (greedy decoding on exact arithmetic), so output order can be checked by content."""
    assert engine.generate([]) == [], "an empty batch gives an empty list"
    reqs = conformance_requests()
    outputs = engine.generate(reqs)
    assert isinstance(outputs, list) and len(outputs) == len(reqs), "one output per request"
    for i, out in enumerate(outputs):
        if i == BROKEN_INDEX:
            assert isinstance(out, EngineOutput)
            assert isinstance(out.error, str) and out.error, "the broken request must carry an error"
        else:
            check_output(out)
    # order: a request alone gets what it got inside the batch (deterministic engines), or at
    # least a well-formed answer (sampling engines, servers)
    alone = engine.generate([reqs[-1]])
    assert len(alone) == 1
    check_output(alone[0])
    if deterministic:
        assert alone[0].text == outputs[-1].text, "outputs are not in request order"
    description = engine.describe()
    assert isinstance(description, dict) and description.get("engine")
    # what it serves, for the worker's identity: a readable name and what runs it
    served = engine.served_model()
    assert isinstance(served, ServedModel) and served.name and served.runtime.get("library")
    return outputs
