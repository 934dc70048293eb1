"""A model in memory measured on held-out scenes, through the project's transformers engine.

The questions are the pre-annotation pipeline's (:func:`egm.queries.build_queries`): in
``multi`` mode one multi-category prompt per scene naming every label, in ``per_label``
mode one referring prompt per label, asked whether the scene holds that shape or not.
The engine is :class:`egm.worker.engines.hf.HFEngine` with the serving image budget, so
preprocessing and greedy decoding are those of a worker; answers go through
:func:`egm.parsing.parse_completion` and :func:`egm.scenes.score`. A model that is being
trained comes back in training mode with its gradients on.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from egm.contract import LabelTarget
from egm.images.decode import to_rgb
from egm.parsing import parse_completion
from egm.prompts import PromptTemplates
from egm.queries import build_queries
from egm.scenes import Scene, scene_file, score
from egm.worker.engines.base import DecodingConfig, EngineRequest
from egm.worker.engines.hf import HFEngine

MODES = ("multi", "per_label")


@dataclass(frozen=True)
class HeldOut:
    """The scenes to measure on and how the pipeline asks about them."""

    scenes: list[Scene]
    images: Path
    templates: PromptTemplates
    #: the labeling config's boxes and labels (:func:`egm.labelstudio.config.parse_labeling_config`)
    target: LabelTarget
    min_pixels: int
    max_pixels: int
    max_new_tokens: int = 160
    batch_size: int = 128

    def subset(self, n: int) -> HeldOut:
        return HeldOut(self.scenes[:n], self.images, self.templates, self.target, self.min_pixels,
                       self.max_pixels, self.max_new_tokens, self.batch_size)


@contextmanager
def _inference(model: Any):
    """Eval mode without gradients inside; the previous mode and ``requires_grad`` flags after."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def evaluate(model: Any, processor: Any, heldout: HeldOut, modes: tuple[str, ...] = MODES,
             samples: int = 3) -> dict[str, dict]:
    """Per mode: :meth:`egm.scenes.Score.to_json` plus parse statuses, a few answers and the time."""
    results = {}
    images = {s.seed: _load(heldout.images / scene_file(s.seed)) for s in heldout.scenes}
    target = heldout.target
    with _inference(model):
        engine = HFEngine.from_model(model, processor, DecodingConfig(max_new_tokens=heldout.max_new_tokens),
                                     max_pixels=heldout.max_pixels, min_pixels=heldout.min_pixels,
                                     batch_size=heldout.batch_size)
        for mode in modes:
            started = time.perf_counter()
            asked = [(scene, query) for scene in heldout.scenes
                     for query in build_queries(target, heldout.templates, mode)]
            outputs = engine.generate([EngineRequest(images[s.seed], q.text) for s, q in asked])
            statuses: Counter[str] = Counter()
            predictions: dict[int, list] = {s.seed: [] for s in heldout.scenes}
            examples = []
            for (scene, query), out in zip(asked, outputs):
                parsed = parse_completion(out.text)
                statuses[parsed.status.value] += 1
                for box in parsed.boxes:
                    # the worker's rule (egm.worker.batch_processor): the query's label, else the model's, mapped
                    label = query.label or target.resolve_label(box.label)
                    if label is not None:
                        predictions[scene.seed].append((label, box.box))
                if len(examples) < samples:
                    examples.append({"seed": scene.seed, "prompt": query.text, "answer": out.text})
            scored = score((s, predictions[s.seed]) for s in heldout.scenes).to_json()
            scored.update(mode=mode, requests=len(asked), parse_status=dict(statuses), examples=examples,
                          seconds=round(time.perf_counter() - started, 2))
            results[mode] = scored
    return results


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(im)
