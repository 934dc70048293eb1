"""Reading Label Studio labeling configs: where boxes go and where the typed prompt comes from.

Label Studio re-sends the labeling config with every ``/predict`` call, so parsed
configs are cached by the hash of their text.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from egm.contract import LabelTarget

_CACHE_SIZE = 256
_PROMPT_NAME = "prompt"
_REASONING_NAME = "reasoning"
#: the task-level TextArea for the image-level reasoning is recognised by this name only
#: (so a config's only free TextArea is never mistaken for it, nor it for the prompt).
IMAGE_REASONING_NAME = "image_reasoning"


class LabelingConfigError(ValueError):
    """The labeling config cannot be used for box pre-annotation."""


@dataclass(frozen=True)
class LabelingConfig:
    target: LabelTarget
    #: non-per-region TextArea whose typed text is the referring expression (interactive mode).
    prompt_from_name: str | None
    #: data key from the Image tag's ``value="$image"``.
    image_value_key: str


_cache: OrderedDict[str, LabelingConfig | LabelingConfigError] = OrderedDict()
_cache_lock = threading.Lock()


def parse_labeling_config(xml: str) -> LabelingConfig:
    """Parse a labeling config (cached by content hash). Raises ``LabelingConfigError``."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelingConfigError("labeling config is empty")
    key = hashlib.sha256(xml.encode("utf-8", "surrogatepass")).hexdigest()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is None:
        try:
            hit = _parse(xml)
        except LabelingConfigError as exc:
            hit = exc  # remember bad configs too: they come back on every /predict
        with _cache_lock:
            _cache[key] = hit
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    if isinstance(hit, LabelingConfigError):
        raise LabelingConfigError(str(hit))
    # Hand out a copy: LabelTarget is mutable and the cached one is shared.
    return LabelingConfig(target=hit.target.model_copy(deep=True), prompt_from_name=hit.prompt_from_name,
                          image_value_key=hit.image_value_key)


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _parse(xml: str) -> LabelingConfig:
    interface = _interface(xml)
    images = {o.name: o for o in interface.objects if _tag(o) == "image"}
    if not images:
        raise LabelingConfigError("labeling config has no <Image> tag")
    rect = next((c for c in interface.controls
                 if _tag(c) == "rectanglelabels" and any(n in images for n in c.to_name or [])), None)
    if rect is None:
        raise LabelingConfigError("labeling config has no <RectangleLabels> pointing at an <Image> (toName)")
    image = images[next(n for n in rect.to_name if n in images)]
    image_key = _value_key(image)
    labels, aliases = _labels_and_aliases(rect)
    if not labels:
        raise LabelingConfigError(f'<RectangleLabels name="{rect.name}"> has no <Label> values')
    textareas = [c for c in interface.controls if _tag(c) == "textarea" and image.name in (c.to_name or [])]
    reasoning = _pick(textareas, per_region=True, preferred=_REASONING_NAME)
    image_reasoning = next((t.name for t in textareas if t.name.lower() == IMAGE_REASONING_NAME
                            and not _is_true((t.attr or {}).get("perRegion"))), None)
    prompt = _pick([t for t in textareas if t.name != image_reasoning], per_region=False, preferred=_PROMPT_NAME)
    target = LabelTarget(from_name=rect.name, to_name=image.name, labels=labels, aliases=aliases,
                         reasoning_from_name=reasoning, image_reasoning_from_name=image_reasoning,
                         image_key=image_key)
    return LabelingConfig(target=target, prompt_from_name=prompt, image_value_key=image_key)


def _interface(xml: str):
    from label_studio_sdk.label_interface import LabelInterface

    try:
        return LabelInterface(xml)
    except Exception as exc:  # the SDK raises lxml, pydantic and its own errors alike
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LabelingConfigError(f"labeling config is not valid XML for Label Studio: {message}") from None


def _tag(tag: Any) -> str:
    return str(getattr(tag, "tag", "") or "").lower()


def _value_key(image: Any) -> str:
    value = str(getattr(image, "value", "") or "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise LabelingConfigError(f'<Image name="{image.name}"> needs value="$<data key>", got "{value}"')
    return value[1:]


def _labels_and_aliases(control: Any) -> tuple[list[str], dict[str, str]]:
    """Config labels in order, and model label (lower-cased) -> config label."""
    labels: list[str] = []
    aliases: dict[str, str] = {}
    for value, label_tag in (getattr(control, "labels_attrs", None) or {}).items():
        if not value or value in labels:
            continue
        labels.append(value)
        attrs = getattr(label_tag, "attr", {}) or {}
        # A Label's alias is what results store; its visible value is a name the model may use too.
        names = [value, attrs.get("value") or ""]
        names += str(attrs.get("predicted_values") or "").split(",")
        for name in names:
            key = name.strip().lower()
            if key and key not in aliases:
                aliases[key] = value
    # The label itself always wins over another label's predicted_values.
    for value in labels:
        aliases[value.strip().lower()] = value
    return labels, aliases


def _pick(textareas: list[Any], *, per_region: bool, preferred: str) -> str | None:
    matching = [t for t in textareas if _is_true((t.attr or {}).get("perRegion")) == per_region]
    for t in matching:
        if t.name.lower() == preferred:
            return t.name
    return matching[0].name if matching else None


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- interactive prompt


def extract_prompt(context: Any, prompt_from_name: str | None) -> str | None:
    """The text typed into the prompt TextArea, from ``/predict``'s ``params.context``.

    Label Studio sends ``{"result": [{"type": "textarea", "from_name": "prompt",
    "value": {"text": ["a purple square"]}}]}``. With several submissions the latest
    non-empty one wins. Anything else (missing, other shapes, junk) gives ``None``.
    """
    if isinstance(context, dict) and isinstance(context.get("context"), dict):
        context = context["context"]  # the whole params object was passed
    if not isinstance(context, dict):
        return None
    results = context.get("result")
    if isinstance(results, dict):
        results = [results]
    if not isinstance(results, list):
        return None
    found: str | None = None
    for item in results:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() != "textarea":
            continue
        if prompt_from_name is not None and item.get("from_name") != prompt_from_name:
            continue
        text = _last_text(item.get("value"))
        if text:
            found = text
    return found


def _last_text(value: Any) -> str | None:
    texts = value.get("text") if isinstance(value, dict) else value
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        return None
    cleaned = [" ".join(t.split()) for t in texts if isinstance(t, str) and t.strip()]
    return cleaned[-1] if cleaned else None
