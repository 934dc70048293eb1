"""The worker's own :class:`~egm.identity.ModelIdentity`, computed from what its engine really loaded.

Called once the engine is up (and again when a served model may have changed): the engine says
what it serves (:meth:`Engine.served_model`), a local checkpoint is fingerprinted by content
(:mod:`egm.worker.fingerprint`), and the decoding, scoring and prompt settings this worker runs
with are added. Nothing here reads what a planner asked for.
"""

from __future__ import annotations

import logging

from egm.config.settings import Settings
from egm.identity import ModelIdentity, prompt_setup
from egm.worker.engines.base import Engine
from egm.worker.fingerprint import checkpoint_fingerprint

log = logging.getLogger(__name__)


class IdentityError(RuntimeError):
    """The worker cannot say what it serves (so it must not serve)."""


def decoding_setup(engine: Engine, settings: Settings) -> dict:
    """Decoding and scoring settings that change an answer or its score."""
    d = engine.decoding
    samples = settings.uncertainty_samples if settings.uncertainty in ("samples", "both") else 1
    return {"max_new_tokens": d.max_new_tokens, "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
            "max_pixels": engine.max_pixels, "min_pixels": engine.min_pixels,
            "uncertainty": settings.uncertainty, "uncertainty_samples": max(1, samples)}


def identify(engine: Engine, settings: Settings) -> ModelIdentity:
    served = engine.served_model()
    model = dict(served.details)
    if served.checkpoint:
        fp = checkpoint_fingerprint(served.checkpoint, settings.state_dir)
        model.update(checkpoint=fp.digest, path=served.checkpoint)
        log.info("checkpoint fingerprinted", extra={
            "path": served.checkpoint, "files": len(fp.files), "hashed_mb": round(fp.hashed_bytes / 2**20, 1),
            "from_cache": fp.cached_files, "seconds": round(fp.seconds, 3), "cache": fp.cache_path})
    if not model:
        raise IdentityError(f"the {engine.name} engine cannot say which model it serves (no checkpoint folder "
                            f"and no server id): set MODEL_DIR to the checkpoint folder")
    return ModelIdentity(engine=engine.name, name=served.name, model=model, runtime=served.runtime,
                         decoding=decoding_setup(engine, settings), prompts=prompt_setup(settings))
