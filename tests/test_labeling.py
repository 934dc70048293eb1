"""Labeling-config reading (egm/labelstudio/config.py) and the shipped templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from egm.labelstudio.config import LabelingConfigError, clear_cache, extract_prompt, parse_labeling_config

TEMPLATES = Path(__file__).resolve().parents[1] / "config" / "labeling"


def _config(body: str) -> str:
    return f"<View>{body}</View>"


IMAGE_BOXES = _config('<Image name="img" value="$photo"/>'
                      '<RectangleLabels name="box" toName="img">'
                      '<Label value="Car" predicted_values="car, Automobile"/><Label value="Person"/>'
                      '</RectangleLabels>')


@pytest.mark.parametrize("name, prompt, reasoning, image_reasoning", [
    ("boxes.xml", None, None, None),
    ("boxes_prompt.xml", "prompt", None, None),
    ("boxes_reasoning.xml", "prompt", "reasoning", "image_reasoning"),
    ("shapes.xml", None, "reasoning", "image_reasoning"),
])
def test_templates_parse(name, prompt, reasoning, image_reasoning):
    config = parse_labeling_config((TEMPLATES / name).read_text())
    assert config.target.from_name == "label"
    assert config.target.to_name == "image"
    assert config.target.image_key == "image"
    assert len(config.target.labels) >= 2
    assert config.prompt_from_name == prompt
    assert config.target.reasoning_from_name == reasoning
    assert config.target.image_reasoning_from_name == image_reasoning


def _label_colours(xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    return [label.get("background") or "" for label in ET.fromstring(xml).iter("Label")]


def _generated_configs() -> dict[str, str]:
    from egm.cli.commands.demo import DEMO_CONFIG
    from tests.stack import BOXES_CONFIG

    return {"demo": DEMO_CONFIG, "tests/stack.py": BOXES_CONFIG}


@pytest.mark.parametrize("name", [*sorted(p.name for p in TEMPLATES.glob("*.xml")), "demo", "tests/stack.py"])
def test_every_label_has_its_own_colour(name):
    import re

    xml = (TEMPLATES / name).read_text() if name.endswith(".xml") else _generated_configs()[name]
    colours = _label_colours(xml)
    assert colours and all(re.fullmatch(r"#[0-9a-fA-F]{6}", c) for c in colours), colours
    assert len(set(c.lower() for c in colours)) == len(colours), f"{name}: two labels share a colour"


def test_a_template_shows_predicted_values():
    config = parse_labeling_config((TEMPLATES / "boxes.xml").read_text())
    assert config.target.resolve_label("automobile") == "Car"


def test_names_keys_labels_and_aliases():
    config = parse_labeling_config(IMAGE_BOXES)
    target = config.target
    assert (target.from_name, target.to_name, target.image_key) == ("box", "img", "photo")
    assert target.labels == ["Car", "Person"]
    assert target.aliases == {"car": "Car", "automobile": "Car", "person": "Person"}
    assert target.resolve_label("AUTOMOBILE ") == "Car"
    assert target.resolve_label("person") == "Person"
    assert target.resolve_label("tree") is None


def test_label_value_beats_other_labels_predicted_values():
    xml = _config('<Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
                  '<Label value="Vehicle" predicted_values="car,truck"/><Label value="Car"/></RectangleLabels>')
    aliases = parse_labeling_config(xml).target.aliases
    assert aliases["car"] == "Car"
    assert aliases["truck"] == "Vehicle"


def test_label_alias_is_the_stored_value():
    xml = _config('<Image name="i" value="$image"/><RectangleLabels name="r" toName="i">'
                  '<Label value="Motor vehicle" alias="car"/></RectangleLabels>')
    target = parse_labeling_config(xml).target
    assert target.labels == ["car"]
    assert target.resolve_label("motor vehicle") == "car"


def test_prompt_and_reasoning_textareas_are_told_apart():
    xml = _config('<Image name="i" value="$image"/>'
                  '<RectangleLabels name="r" toName="i"><Label value="A"/></RectangleLabels>'
                  '<TextArea name="why" toName="i" perRegion="true"/>'
                  '<TextArea name="query" toName="i"/>')
    config = parse_labeling_config(xml)
    assert config.prompt_from_name == "query"
    assert config.target.reasoning_from_name == "why"


def test_rectangle_labels_on_a_second_image_is_found():
    xml = _config('<Text name="t" value="$text"/><Image name="a" value="$first"/><Image name="b" value="$second"/>'
                  '<RectangleLabels name="r" toName="b"><Label value="A"/></RectangleLabels>')
    config = parse_labeling_config(xml)
    assert (config.target.to_name, config.target.image_key) == ("b", "second")


@pytest.mark.parametrize("xml, words", [
    (_config('<Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="x"/></Choices>'),
     "RectangleLabels"),
    (_config('<Text name="t" value="$text"/><Labels name="l" toName="t"><Label value="x"/></Labels>'), "Image"),
    (_config('<Image name="i" value="$image"/><Text name="t" value="$text"/>'
             '<RectangleLabels name="r" toName="t"><Label value="x"/></RectangleLabels>'), "RectangleLabels"),
    (_config('<Image name="i" value="$image"/><RectangleLabels name="r" toName="i"></RectangleLabels>'),
     "no <Label>"),
    (_config('<Image name="i" value="https://x/y.png"/><RectangleLabels name="r" toName="i">'
             '<Label value="x"/></RectangleLabels>'), "$<data key>"),
    ("<View><Image name='i' value='$image'>", "not valid XML"),
    ("this is not xml at all", "not valid XML"),
    ("   ", "empty"),
])
def test_unusable_configs_raise_clear_errors(xml, words):
    with pytest.raises(LabelingConfigError) as info:
        parse_labeling_config(xml)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_config_raises_again_from_cache():
    clear_cache()
    for _ in range(2):
        with pytest.raises(LabelingConfigError, match="RectangleLabels"):
            parse_labeling_config(_config('<Image name="i" value="$image"/>'))


def test_cache_hands_out_independent_copies():
    first = parse_labeling_config(IMAGE_BOXES)
    first.target.labels.append("Mutated")
    first.target.aliases["mutated"] = "Mutated"
    second = parse_labeling_config(IMAGE_BOXES)
    assert second.target.labels == ["Car", "Person"]
    assert "mutated" not in second.target.aliases


# --------------------------------------------------------------------------- prompt from params.context


def _ctx(*items):
    return {"result": list(items)}


def _textarea(text, from_name="prompt"):
    return {"type": "textarea", "from_name": from_name, "to_name": "image", "value": {"text": text}}


@pytest.mark.parametrize("context, expected", [
    (_ctx(_textarea(["a purple square"])), "a purple square"),
    (_ctx(_textarea("the  dog\n on the left ")), "the dog on the left"),
    (_ctx(_textarea(["first try", "", "the second one"])), "the second one"),
    (_ctx(_textarea(["kept"]), _textarea(["   "])), "kept"),
    (_ctx({"type": "TextArea", "from_name": "prompt", "value": {"text": ["Case"]}}), "Case"),
    ({"result": _textarea(["single dict"])}, "single dict"),
    ({"context": _ctx(_textarea(["whole params"]))}, "whole params"),
    (_ctx({"type": "rectanglelabels", "from_name": "label", "value": {"x": 1}}, _textarea(["after box"])),
     "after box"),
    (_ctx(_textarea(["other field"], from_name="notes")), None),
    (None, None),
    ({}, None),
    ("a string", None),
    ([1, 2], None),
    ({"result": None}, None),
    ({"result": "junk"}, None),
    ({"result": [None, 3, "x", {"type": "textarea"}]}, None),
    (_ctx({"type": "textarea", "from_name": "prompt", "value": None}), None),
    (_ctx({"type": "textarea", "from_name": "prompt", "value": {"text": [1, None, {}]}}), None),
    (_ctx({"type": "textarea", "from_name": "prompt", "value": {"text": 42}}), None),
])
def test_extract_prompt(context, expected):
    assert extract_prompt(context, "prompt") == expected


def test_extract_prompt_without_a_configured_name_takes_any_textarea():
    assert extract_prompt(_ctx(_textarea(["anything"], from_name="notes")), None) == "anything"
