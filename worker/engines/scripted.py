"""An engine that answers with fixed EGM-format text: for tests, demos and pipeline benchmarks.

It exercises everything around the model (queueing, parsing, conversion, Label
Studio writes) with known boxes. The completion template may use ``{label}``
(first label of a multi-category prompt or the referring expression),
``{w}``/``{h}`` (image size the engine received) and a stable per-image box.

Like a real engine it returns the generated tokens (one per character) with their
log-probabilities: digits get ``log p`` with ``p`` a stable per-image value in [0.3, 0.95],
everything else ``0``, so box and task scores exist and differ between images (what the
Data Manager's score column and active learning sort by).
"""

from __future__ import annotations

import hashlib
import math
import re
import time

from egm.worker.engines.base import DecodingConfig, Engine, EngineOutput, EngineRequest, ServedModel

DEFAULT_TEMPLATE = (
    "The {label} is in the region the annotator asked about.\n</think>\n\n"
    "```json\n[\n\t{{\"bbox_2d\": [{x1}, {y1}, {x2}, {y2}], \"label\": \"{label}\"}}\n]\n```"
)

_CATEGORIES = re.compile(r'categories:\s*"([^"]*)"')
_REFERRING = re.compile(r"Locate (.+?)(?: amodally)?, output", re.S)


def prompt_label(prompt: str) -> str:
    m = _CATEGORIES.search(prompt)
    if m:
        return m.group(1).split(",")[0].strip() or "object"
    m = _REFERRING.search(prompt)
    return m.group(1).strip() if m else "object"


def stable_confidence(image_bytes_digest: str) -> float:
    """A deterministic per-image digit probability in [0.3, 0.95]."""
    return 0.3 + 0.65 * bytes.fromhex(image_bytes_digest)[4] / 255


def scripted_logprobs(text: str, p: float) -> tuple[list[str], list[float]]:
    """One token per character; digits are written with probability ``p``, the rest with certainty."""
    tokens = list(text)
    return tokens, [math.log(p) if t.isdigit() else 0.0 for t in tokens]


def stable_box(image_bytes_digest: str) -> tuple[int, int, int, int]:
    """A deterministic, valid box derived from the image content (so re-runs agree)."""
    d = bytes.fromhex(image_bytes_digest)
    x1, y1 = d[0] % 400, d[1] % 400
    return x1, y1, x1 + 100 + d[2] % 400, y1 + 100 + d[3] % 400


#: the scripted engine offers a pause (``between_steps``) this often during its simulated GPU time
PAUSE_EVERY_S = 0.05


class ScriptedEngine(Engine):
    name = "scripted"
    pauses = True

    def __init__(self, decoding: DecodingConfig | None = None, max_pixels: int = 1 << 30,
                 template: str | None = None, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        super().__init__(decoding or DecodingConfig(), max_pixels)
        self.template = template or DEFAULT_TEMPLATE
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls = 0
        self.requests_seen = 0
        self._busy = False  # a generate() in progress: one run during its pause does not pause again

    def served_model(self) -> ServedModel:
        """Its "model" is the script (and the class that plays it): other answers, another model."""
        material = f"{type(self).__module__}.{type(self).__qualname__}\0{self.template}\0{self.fail_on or ''}"
        script = hashlib.sha256(material.encode()).hexdigest()
        return ServedModel(name="scripted", details={"script": script}, runtime={"library": "egm-scripted"})

    def generate(self, requests: list[EngineRequest], between_steps=None) -> list[EngineOutput]:
        self.calls += 1
        self.requests_seen += len(requests)
        nested, self._busy = self._busy, True
        try:
            self._simulate_gpu(None if nested else between_steps)
        finally:
            self._busy = nested
        outputs = []
        for req in requests:
            if self.fail_on and self.fail_on in req.prompt:
                outputs.append(EngineOutput(text="", error=f"scripted failure for prompt containing {self.fail_on!r}"))
                continue
            digest = hashlib.sha256(req.image.tobytes()[:4096] + repr(req.image.size).encode()).hexdigest()
            x1, y1, x2, y2 = stable_box(digest)
            text = self.template.format(label=prompt_label(req.prompt), w=req.image.width, h=req.image.height,
                                        x1=x1, y1=y1, x2=x2, y2=y2)
            tokens, logprobs = scripted_logprobs(text, stable_confidence(digest))
            outputs.append(EngineOutput(text=text, tokens=tokens, logprobs=logprobs))
        return outputs

    def _simulate_gpu(self, between_steps) -> None:
        """Sleep ``delay_s``, offering a pause every ``PAUSE_EVERY_S`` (what runs in it is not counted)."""
        left = self.delay_s
        while left > 0:
            step = min(left, PAUSE_EVERY_S)
            time.sleep(step)
            left -= step
            if between_steps is not None and left > 0:
                try:
                    between_steps()
                except Exception:  # noqa: BLE001 - a pause never fails the batch
                    pass
