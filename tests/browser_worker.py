"""A worker for the browser suite: the real queue worker, with an engine that answers like EGM
about the bundled sample images' true shapes (egm/samples/boxes.json).

Run as ``python -m tests.browser_worker`` (settings from the environment, as ``egm-assist worker``).

* A multi-category prompt (pre-annotation) gets every true shape of the image EXCEPT the one
  named in ``MISSED`` (so a typed prompt has something left to find), with a reasoning that
  speaks of each shape in its own sentences after one sentence about the whole image.
* A referring prompt gets the shape it names AND, like a model that boxes too much, every
  other shape again: the backend must not suggest those a second time.
* Every digit of the answer is "written" with a per-image probability, so box and task scores
  exist and differ between images (the Data Manager's score column sorts by them).

The answers are keyed by image size, which is unique among the images the suite uses.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from egm.worker.engines.base import EngineOutput, EngineRequest
from egm.worker.engines.scripted import ScriptedEngine

SAMPLES = Path(__file__).resolve().parent.parent / "egm" / "samples"
TRUTH = json.loads((SAMPLES / "boxes.json").read_text())["images"]
#: images the suite uploads, and the shape pre-annotation misses on each
IMAGES = ["shapes.jpg", "wide.jpg", "tall.jpg"]
MISSED = {"wide.jpg": "circle"}
#: probability of each coordinate digit per image: the task's score (distinct, so sorting shows)
CONFIDENCE = {"shapes.jpg": 0.9, "wide.jpg": 0.35, "tall.jpg": 0.6}
WHERE = {"square": "has four sharp corners", "circle": "is perfectly round", "triangle": "points upwards"}
_REFERRING = re.compile(r"Locate (.+?)(?: amodally)?, output", re.S)


def _grid(pixels: list[int], width: int, height: int) -> list[int]:
    x1, y1, x2, y2 = pixels
    return [round(x1 * 1000 / width), round(y1 * 1000 / height), round(x2 * 1000 / width), round(y2 * 1000 / height)]


def _answer(reasoning: str, boxes: list[tuple[str, list[int]]]) -> str:
    body = ",\n".join(f'\t{{"bbox_2d": {json.dumps(box)}, "label": "{label}"}}' for label, box in boxes)
    return f"{reasoning}\n</think>\n\n```json\n[\n{body}\n]\n```"


def completion(name: str, prompt: str) -> str:
    info = TRUTH[name]
    shapes = [(o["label"], _grid(o["pixels"], info["width"], info["height"])) for o in info["objects"]]
    referring = _REFERRING.search(prompt)
    if referring and "categories" not in prompt:
        expression = referring.group(1).strip()
        wanted = [s for s in shapes if s[0] in expression.lower()]
        others = [s for s in shapes if s not in wanted]
        subject = expression if expression.lower().startswith(("the ", "a ")) else f"the {expression}"
        text = (f"{subject[0].upper()}{subject[1:]} is where the annotator pointed; "
                f"it {WHERE[wanted[0][0]] if wanted else 'is not clear'}.")
        return _answer(text, [(expression, box) for _, box in wanted] + others)
    kept = [s for s in shapes if s[0] != MISSED.get(name)]
    sentences = ["I look at the shapes on the white background."]
    sentences += [f"The {label} {WHERE[label]}. It is drawn in one flat colour." for label, _ in kept]
    return _answer(" ".join(sentences), kept)


class SampleShapesEngine(ScriptedEngine):
    name = "scripted"

    def generate(self, requests: list[EngineRequest]) -> list[EngineOutput]:
        self.calls += 1
        self.requests_seen += len(requests)
        by_size = {(TRUTH[n]["width"], TRUTH[n]["height"]): n for n in IMAGES}
        outputs = []
        for req in requests:
            name = by_size.get(req.image.size)
            if name is None:
                outputs.append(EngineOutput(text="", error=f"browser engine: unknown image size {req.image.size}"))
                continue
            text = completion(name, req.prompt)
            tokens = list(text)
            logp = math.log(CONFIDENCE[name])
            outputs.append(EngineOutput(text=text, tokens=tokens,
                                        logprobs=[logp if t.isdigit() else 0.0 for t in tokens]))
        return outputs


def main() -> None:
    from egm.config.settings import get_settings
    from egm.logs import configure_logging
    from egm.worker.batch_worker import run_worker

    settings = get_settings()
    configure_logging(settings)
    run_worker(settings, engine=SampleShapesEngine(template="browser-suite: egm/samples/boxes.json"))


if __name__ == "__main__":
    main()
