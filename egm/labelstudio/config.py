"""Reading Label Studio labeling configs and interactive contexts.

The config says where boxes go, where the typed prompt comes from and where a message for
the annotator can be shown. Label Studio re-sends the labeling config with every
``/predict`` call, so parsed configs are cached by the hash of their text.

An interactive ``/predict`` (Auto-Annotation on) carries ``params.context = {"result": [...]}``.
Label Studio 1.23 puts there what the annotator just did: the typed prompt as a ``textarea``
item (Shift+Enter), nothing at all on Submit (``{"result": []}``), and, with smart tools, the
regions drawn. Read from it here:

* the typed prompt (:func:`extract_prompt`);
* the label the annotator selected, when a release sends it (1.23 does not): a
  ``rectanglelabels``/``labels`` item *without* geometry (:func:`extract_selected_label`);
* the annotator's regions: ``rectanglelabels``/``rectangle`` items *with* geometry
  (``value.x/y/width/height`` in percent), as :class:`egm.geometry.PercentRect` (:func:`context_rectangles`).

The XML is read with the standard library, following the rules of label-studio-sdk's
``LabelInterface`` for what this project needs: a *control* tag has ``name`` and
``toName`` (a comma-separated list); an *object* tag has ``name`` and ``value`` (or
``valueList``); a ``<Label>`` / ``<Choice>`` belongs to its nearest enclosing control and
is keyed by its ``alias``, else its ``value``. Not importing the SDK keeps its pandas,
numpy and opencv out of the backend and its image (the SDK stays an optional extra, ``sdk``).
"""

from __future__ import annotations

import hashlib
import threading
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from egm.contract import LabelTarget

_CACHE_SIZE = 256
_PROMPT_NAME = "prompt"
_REASONING_NAME = "reasoning"
#: the task-level TextArea for the image-level reasoning is recognised by this name only
#: (so a config's only free TextArea is never mistaken for it, nor it for the prompt).
IMAGE_REASONING_NAME = "image_reasoning"
_MESSAGE_NAME = "message"


class LabelingConfigError(ValueError):
    """The labeling config cannot be used for box pre-annotation."""


@dataclass(frozen=True)
class LabelingConfig:
    target: LabelTarget
    #: non-per-region TextArea whose typed text is the referring expression (interactive mode).
    #: The data key of the image (the Image tag's ``value="$image"``) is ``target.image_key``.
    prompt_from_name: str | None
    #: The data key of the image (the Image tag's ``value="$image"``) is ``target.image_key``.
    #: non-per-region TextArea that shows the annotator why an interactive request gave no box
    #: (named ``message`` if there is one, else another non-per-region TextArea than the prompt).
    message_from_name: str | None = None
    #: label of a typed prompt's box when the prompt names none: a ``<Label default="true">``, else a
    #: ``<Label selected="true">`` (the label Label Studio preselects in the toolbar).
    default_label: str | None = None


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
                          message_from_name=hit.message_from_name,
                          default_label=hit.default_label)


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
    named_message = [t for t in textareas if t.name.lower() == _MESSAGE_NAME
                     and not _is_true((t.attr or {}).get("perRegion"))]
    prompt = _pick([t for t in textareas if t not in named_message and t.name != image_reasoning],
                   per_region=False, preferred=_PROMPT_NAME)
    # the image's reasoning area takes a message only when the config has no other free TextArea
    others = sorted((t for t in textareas if t.name != prompt), key=lambda t: t.name == image_reasoning)
    message = named_message[0].name if named_message else _pick(others, per_region=False, preferred=_MESSAGE_NAME)
    target = LabelTarget(from_name=rect.name, to_name=image.name, labels=labels, aliases=aliases,
                         reasoning_from_name=reasoning, image_reasoning_from_name=image_reasoning,
                         image_key=image_key)
    return LabelingConfig(target=target, prompt_from_name=prompt,
                          message_from_name=message, default_label=_default_label(rect))


@dataclass
class _Tag:
    """One tag of the config, as much of it as the reading below needs."""

    tag: str
    name: str
    attr: dict[str, str]
    value: str | None = None
    to_name: list[str] = field(default_factory=list)
    #: Label/Choice children of a control: stored value (alias or value) -> that child tag.
    labels_attrs: dict[str, "_Tag"] = field(default_factory=dict)


@dataclass
class _Interface:
    objects: list[_Tag]
    controls: list[_Tag]


_NOT_CONTROL_TAGS = {"Filter"}
_LABEL_TAGS = {"Label", "Choice", "Relation"}


def _interface(xml: str) -> _Interface:
    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LabelingConfigError(f"labeling config is not valid XML for Label Studio: {message}") from None
    parents = {child: parent for parent in root.iter() for child in parent}
    objects: dict[str, _Tag] = {}
    controls: dict[str, _Tag] = {}
    for element in root.iter():
        attr = {k: str(v) for k, v in element.attrib.items()}
        name = attr.get("name")
        if name and attr.get("toName") and element.tag not in _NOT_CONTROL_TAGS:
            controls[name] = _Tag(tag=element.tag, name=name, attr=attr, to_name=attr["toName"].split(","))
        elif name and (attr.get("value") or attr.get("valueList")):
            objects[name] = _Tag(tag=element.tag, name=name, attr=attr, value=attr.get("valueList", attr.get("value")))
        elif element.tag in _LABEL_TAGS:
            parent = _parent_control(element, parents, controls)
            stored = attr.get("alias") or attr.get("value")
            if parent is not None and stored is not None:
                parent.labels_attrs[stored] = _Tag(tag=element.tag, name=stored, attr=attr, value=stored)
    return _Interface(objects=list(objects.values()), controls=list(controls.values()))


def _parent_control(element: ElementTree.Element, parents: dict, controls: dict[str, _Tag]) -> _Tag | None:
    """The nearest enclosing control tag (a Label may sit in nested Views inside it)."""
    parent = parents.get(element)
    while parent is not None:
        name = parent.attrib.get("name")
        if name in controls:
            return controls[name]
        parent = parents.get(parent)
    return None


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


def _default_label(control: Any) -> str | None:
    tags = [(value, getattr(tag, "attr", {}) or {}) for value, tag in (getattr(control, "labels_attrs", None) or {}).items()]
    for attribute in ("default", "selected"):
        for value, attrs in tags:
            if value and _is_true(attrs.get(attribute)):
                return value
    return None


def _pick(textareas: list[Any], *, per_region: bool, preferred: str) -> str | None:
    matching = [t for t in textareas if _is_true((t.attr or {}).get("perRegion")) == per_region]
    for t in matching:
        if t.name.lower() == preferred:
            return t.name
    return matching[0].name if matching else None


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- interactive prompt


def _context_items(context: Any) -> list[dict]:
    """The ``result`` items of an interactive context (``[]`` for anything else)."""
    if isinstance(context, dict) and isinstance(context.get("context"), dict):
        context = context["context"]  # the whole params object was passed
    if not isinstance(context, dict):
        return []
    results = context.get("result")
    if isinstance(results, dict):
        results = [results]
    return [item for item in results if isinstance(item, dict)] if isinstance(results, list) else []


def _rect_value(item: dict) -> dict | None:
    value = item.get("value")
    if not isinstance(value, dict) or str(item.get("type", "")).lower() not in ("rectanglelabels", "rectangle"):
        return None
    return value


def _has_geometry(value: dict) -> bool:
    return all(isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool)
               for k in ("x", "y", "width", "height"))


def extract_selected_label(context: Any, target: LabelTarget) -> str | None:
    """The config label the annotator selected, when the context carries one (a labels item without geometry)."""
    for item in _context_items(context):
        value = item.get("value")
        kind = str(item.get("type", "")).lower()
        if not isinstance(value, dict) or kind not in ("rectanglelabels", "labels") or _has_geometry(value):
            continue
        names = value.get("rectanglelabels") or value.get("labels")
        if isinstance(names, list):
            for name in names:
                if isinstance(name, str) and name in target.labels:
                    return name
    return None


def context_rectangles(context: Any) -> list[dict]:
    """The rectangle ``value`` dicts (percent geometry) of the regions in an interactive context."""
    out = []
    for item in _context_items(context):
        value = _rect_value(item)
        if value is not None and _has_geometry(value):
            out.append(value)
    return out


def result_rectangles(result: Any) -> list[dict]:
    """The rectangle ``value`` dicts of a stored result list (a prediction's, annotation's or draft's)."""
    if not isinstance(result, list):
        return []
    return [v for v in (_rect_value(i) for i in result if isinstance(i, dict)) if v is not None and _has_geometry(v)]


def extract_prompt(context: Any, prompt_from_name: str | None) -> str | None:
    """The text typed into the prompt TextArea, from ``/predict``'s ``params.context``.

    Label Studio sends ``{"result": [{"type": "textarea", "from_name": "prompt",
    "value": {"text": ["a purple square"]}}]}``. With several submissions the latest
    non-empty one wins. Anything else (missing, other shapes, junk) gives ``None``.
    """
    found: str | None = None
    for item in _context_items(context):
        if str(item.get("type", "")).lower() != "textarea":
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
