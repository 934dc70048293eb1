"""The verl reward shipped with GRPO exports (egm/export/reward.py)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from egm.export.reward import compute_score, last_box, truth_boxes
from egm.parsing import format_completion


def answer(boxes, reasoning="The object is on the left.", label="thing"):
    return format_completion(reasoning, [(b, label) for b in boxes])


def test_own_ground_truth_scores_one():
    gt = [100, 200, 400, 600]
    assert compute_score("grounding", answer([gt]), gt) == 1.0


def test_unparseable_answers_score_zero():
    gt = [100, 200, 400, 600]
    for text in ["", "I cannot find it.", "</think>\n\n```json\n[]\n```", "[1, 2, 3]", None, 42]:
        assert compute_score("grounding", text, gt) == 0.0


def test_egm_formula_on_one_box():
    gt = [0, 0, 100, 100]
    half = [0, 0, 100, 50]  # IoU 0.5 -> 0.5 + 0.25
    assert compute_score("grounding", answer([half]), gt) == pytest.approx(0.75)
    third = [0, 0, 100, 40]  # IoU 0.4 -> below threshold: 0.2
    assert compute_score("grounding", answer([third]), gt) == pytest.approx(0.2)
    assert compute_score("grounding", answer([[500, 500, 600, 600]]), gt) == 0.0


def test_one_box_takes_the_last_box_like_egm():
    gt = [100, 100, 200, 200]
    text = "First I thought [500, 500, 600, 600] but no.\n</think>\n\n[100, 100, 200, 200]"
    assert last_box(text) == (100.0, 100.0, 200.0, 200.0)
    assert compute_score("grounding", text, gt) == 1.0
    wrong_last = answer([gt, [700, 700, 800, 800]])
    assert compute_score("grounding", wrong_last, gt) == 0.0


def test_swapped_and_out_of_grid_answers_are_sanitized():
    gt = [0, 0, 1000, 500]
    assert compute_score("grounding", "</think> [1200, 500, -5, 0]", gt) == 1.0


def test_several_boxes_flat_and_nested_ground_truth_agree():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    flat, nested = a + b, [a, b]
    perfect = answer([b, a])  # order does not matter
    assert compute_score("grounding", perfect, flat) == 1.0
    assert compute_score("grounding", perfect, nested) == 1.0
    assert compute_score("grounding", perfect, np.array(flat)) == 1.0  # verl hands numpy arrays over


def test_several_boxes_missing_and_extra_cost():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    assert compute_score("grounding", answer([a]), a + b) == pytest.approx(0.5)
    extra = answer([a, b, [800, 0, 900, 100]])
    assert compute_score("grounding", extra, a + b) == pytest.approx(2 / 3)
    assert compute_score("grounding", "no boxes </think> []", a + b) == 0.0


def test_truth_forms():
    assert truth_boxes([1, 2, 3, 4]) == [(1.0, 2.0, 3.0, 4.0)]
    assert len(truth_boxes(list(range(8)))) == 2
    assert truth_boxes([1, 2, 3]) == [] and truth_boxes("1,2,3,4") == [] and truth_boxes(None) == []


def test_the_file_loads_standalone_like_verl_does(tmp_path):
    from egm.export import reward

    copy = tmp_path / "reward.py"
    copy.write_text(open(reward.__file__).read())
    spec = importlib.util.spec_from_file_location("custom_reward", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score("grounding", answer([[1, 2, 30, 40]]), [1, 2, 30, 40], {"id": "x"}) == 1.0


boxes = st.tuples(*[st.integers(0, 1000)] * 4).filter(lambda b: b[0] < b[2] and b[1] < b[3]).map(list)


@hsettings(max_examples=200, deadline=None)
@given(gt=st.lists(boxes, min_size=1, max_size=4), text=st.text(max_size=200))
def test_score_is_bounded_and_own_truth_is_perfect(gt, text):
    flat = [v for b in gt for v in b]
    value = compute_score("grounding", text, flat)
    assert 0.0 <= value <= 1.0 and not math.isnan(value)
    assert compute_score("grounding", answer(gt), flat) == pytest.approx(1.0)
