"""egm.labelstudio.results: each box carries its own label's reasoning; the image's reasoning appears once per task."""

from __future__ import annotations

from egm.contract import BoxResult, LabelTarget
from egm.labelstudio.config import parse_labeling_config
from egm.labelstudio.results import build_result

TARGET = LabelTarget(from_name="label", to_name="image", labels=["circle", "square"],
                     aliases={"circle": "circle", "square": "square", "ring": "circle"},
                     reasoning_from_name="reasoning", image_reasoning_from_name="image_reasoning")
REASONING = ("I look at the shapes. The red circle sits top left. It is large. "
             "A blue square is at the bottom right.")


def _box(label: str, grid: list[int], score: float | None = None) -> BoxResult:
    return BoxResult(label=label, grid=grid, score=score, pixels=[float(v) for v in grid])


BOXES = [_box("circle", [10, 10, 300, 300], 0.9), _box("square", [600, 600, 900, 900], 0.4)]


def _by_type(items: list[dict]) -> tuple[list[dict], dict[str, str], list[dict]]:
    rects = [i for i in items if i["type"] == "rectanglelabels"]
    per_region = {i["id"]: i["value"]["text"][0] for i in items
                  if i["type"] == "textarea" and i["from_name"] == "reasoning"}
    image_level = [i for i in items if i["type"] == "textarea" and i["from_name"] == "image_reasoning"]
    return rects, per_region, image_level


def test_each_box_gets_its_own_labels_reasoning_and_the_image_text_comes_once():
    rects, per_region, image_level = _by_type(build_result(BOXES, TARGET, 640, 480, REASONING))
    circle, square = rects
    assert per_region[circle["id"]] == "The red circle sits top left. It is large."
    assert per_region[square["id"]] == "A blue square is at the bottom right."
    assert len(image_level) == 1 and image_level[0]["value"]["text"] == [REASONING]
    assert "x" not in image_level[0]["value"] and image_level[0]["id"] not in per_region  # no region


def test_a_box_whose_label_the_text_never_names_gets_no_region_text():
    boxes = [_box("square", [1, 1, 50, 50])]
    rects, per_region, image_level = _by_type(build_result(boxes, TARGET, 64, 64, "The red circle is big."))
    assert rects and per_region == {}
    assert image_level[0]["value"]["text"] == ["The red circle is big."]


def test_aliases_of_a_label_count_and_per_label_blocks_are_split():
    boxes = [_box("circle", [1, 1, 50, 50]), _box("square", [60, 60, 90, 90])]
    rects, per_region, _ = _by_type(build_result(boxes, TARGET, 64, 64, "circle: a ring at the top\nsquare: a tile"))
    assert [per_region[r["id"]] for r in rects] == ["a ring at the top", "a tile"]
    rects, per_region, _ = _by_type(build_result(boxes[:1], TARGET, 64, 64, "A ring at the top. A square below."))
    assert per_region[rects[0]["id"]] == "A ring at the top."


def test_a_typed_prompt_keeps_its_whole_reasoning_on_its_box_and_writes_no_task_text():
    boxes = [_box("circle", [1, 1, 50, 50])]
    items = build_result(boxes, TARGET, 64, 64, "The yellow one is left of the middle.", referring=True)
    rects, per_region, image_level = _by_type(items)
    assert per_region == {rects[0]["id"]: "The yellow one is left of the middle."}
    assert image_level == []


def test_configs_without_the_text_areas_get_boxes_only():
    bare = TARGET.model_copy(update={"reasoning_from_name": None, "image_reasoning_from_name": None})
    items = build_result(BOXES, bare, 640, 480, REASONING)
    assert [i["type"] for i in items] == ["rectanglelabels", "rectanglelabels"]


def test_the_image_reasoning_area_is_found_by_name_and_never_taken_for_the_prompt():
    xml = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
           '<Label value="a"/><Label value="b"/></RectangleLabels>'
           '<TextArea name="image_reasoning" toName="image"/>'
           '<TextArea name="why" toName="image" perRegion="true"/></View>')
    config = parse_labeling_config(xml)
    assert config.target.image_reasoning_from_name == "image_reasoning"
    assert config.target.reasoning_from_name == "why"
    assert config.prompt_from_name is None
