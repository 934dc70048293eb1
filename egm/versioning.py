"""``model_version``: one string that changes whenever the model, a prompt template
or a decoding setting changes, so Label Studio never mixes predictions of two setups.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from egm.config.settings import Settings
from egm.prompts import load_templates


def _model_fingerprint(model_path: str) -> dict:
    """For a local folder: config + weight file names and sizes (cheap, no hashing of GBs)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return {"id": model_path}
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in {".safetensors", ".bin", ".json", ".jinja"} and path.is_file():
            files[path.name] = path.stat().st_size
    config = folder / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"dir": folder.name, "files": files, "config": digest}


def decoding_fingerprint(settings: Settings) -> dict:
    return {
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "max_pixels": settings.max_pixels,
        "min_pixels": settings.min_pixels,
        "prompt_mode": settings.prompt_mode,
    }


def model_version(settings: Settings) -> str:
    payload = {
        "model": _model_fingerprint(settings.model_path),
        "decoding": decoding_fingerprint(settings),
        "prompts": load_templates(settings).digest(),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]
    name = Path(settings.model_path.rstrip("/")).name or "model"
    return f"{name}-{digest}"
