"""The verl reward shipped with GRPO exports (egm/export/reward.py).

The parity table holds, for single-box rows, the score of EGM's published reward
(zgq1879/EGM, ``verl/verl/utils/reward_score/grounding.py``, run with the reward_kwargs of
EGM's launch script unless a case says otherwise) on the same inputs; each value was checked
by running that file. The deliberate deviations follow it, each with what EGM does instead.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from egm.export import reward
from egm.export.reward import MULTI_SOURCE, SINGLE_SOURCE, compute_score, egm_answer_box, truth_boxes
from egm.geometry import Box, greedy_match
from egm.parsing import format_completion

GT = [100, 100, 300, 300]
SQUARE = {"width": 1000, "height": 1000, "split": "train"}  # pixels == grid: rounding is invisible
EGM_KWARGS = {"reward_type": "mix", "alpha": 0.5, "threshold": 0.5}  # EGM's launch script


def fmt(box, label="the box"):
    """An answer in EGM's completion format."""
    return ('The box is on the left.\n</think>\n\n```json\n[\n\t{"bbox_2d": ' + json.dumps(box)
            + f', "label": "{label}"}}\n]\n```')


def answer(boxes, reasoning="The object is on the left.", label="thing"):
    return format_completion(reasoning, [(b, label) for b in boxes])


# name, completion, ground truth, extra_info, reward_kwargs, EGM's score
PARITY = [
    ("json answer, exact", fmt(GT), GT, SQUARE, EGM_KWARGS, 1.0),
    ("IoU 0.5: 0.5 + 0.25", fmt([100, 100, 300, 200]), GT, SQUARE, EGM_KWARGS, 0.75),
    ("IoU 0.4: below the threshold", fmt([100, 100, 300, 180]), GT, SQUARE, EGM_KWARGS, 0.2),
    ("no overlap", fmt([500, 500, 600, 600]), GT, SQUARE, EGM_KWARGS, 0.0),
    ("the last bracket wins, even after the answer", fmt(GT) + " or maybe [500, 500, 600, 600]", GT, SQUARE,
     EGM_KWARGS, 0.0),
    ("a box in the reasoning, the answer last", "Not [500, 500, 600, 600].\n</think>\n[100, 100, 300, 300]", GT,
     SQUARE, EGM_KWARGS, 1.0),
    ("no bracket: the last four numbers", "The object spans 100, 100, 300, 300", GT, SQUARE, EGM_KWARGS, 1.0),
    ("no bracket: the last four of more numbers", "I see 3 shapes; it spans 100 100 to 300 300", GT, SQUARE,
     EGM_KWARGS, 1.0),
    ("no bracket, three numbers", "about 100 by 300 at 7", GT, SQUARE, EGM_KWARGS, 0.0),
    ("last bracket with 5 numbers: its first four are read", fmt(GT) + " [500, 500, 600, 600, 7]", GT, SQUARE,
     EGM_KWARGS, 0.0),
    ("last bracket with 5 numbers, first four right", "[100, 100, 300, 300, 9]", GT, SQUARE, EGM_KWARGS, 1.0),
    ("last bracket with 1 number: no box", fmt(GT) + " (see [3])", GT, SQUARE, EGM_KWARGS, 0.0),
    ("empty brackets are no bracket", fmt(GT) + " []", GT, SQUARE, EGM_KWARGS, 1.0),
    ("a label with brackets after the box", fmt(GT, label="box [left]"), GT, SQUARE, EGM_KWARGS, 0.0),
    ("swapped corners are ordered", fmt([300, 300, 100, 100]), GT, SQUARE, EGM_KWARGS, 1.0),
    ("outside the grid is clamped", fmt([-50, 100, 300, 1200]), [0, 100, 300, 1000], SQUARE, EGM_KWARGS, 1.0),
    ("decimals", fmt([100.4, 99.6, 300, 300]), GT, SQUARE, EGM_KWARGS, 1.0),
    ("an exponent is two numbers", "[1e2, 100, 300, 300]", GT, SQUARE, EGM_KWARGS, 0.0),
    ("<answer> is read first", "<answer>[100, 100, 300, 300]</answer> not [500, 500, 600, 600]", GT, SQUARE,
     EGM_KWARGS, 1.0),
    ("<answer> without a box: the whole text", "<answer>left</answer> [100, 100, 300, 300] then 5 6 7 8", GT,
     SQUARE, EGM_KWARGS, 1.0),
    ("ground truth of 8 numbers", fmt(GT), GT + [500, 500, 600, 600], SQUARE, EGM_KWARGS, 0.0),
    ("ground truth of 3 numbers", fmt(GT), GT[:3], SQUARE, EGM_KWARGS, 0.0),
    ("empty answer", "", GT, SQUARE, EGM_KWARGS, 0.0),
    ("pixels: a 7x5 image rounds both boxes alike", fmt([0, 0, 140, 200]), [0, 0, 150, 200],
     {"width": 7, "height": 5}, EGM_KWARGS, 1.0),
    ("pixels: 640x480", fmt([101, 99, 299, 301]), GT, {"width": 640, "height": 480}, EGM_KWARGS, 0.9921875),
    ("pixels: a degenerate box gets one pixel", fmt([100, 100, 100, 100]), [100, 100, 102, 102],
     {"width": 500, "height": 500}, EGM_KWARGS, 1.0),
    ("sigmoid at IoU 0.5", fmt([100, 100, 300, 200]), GT, SQUARE, {**EGM_KWARGS, "reward_type": "sigmoid"}, 0.5),
    ("normalized_exp at IoU 0.5", fmt([100, 100, 300, 200]), GT, SQUARE,
     {**EGM_KWARGS, "reward_type": "normalized_exp"}, 0.8),
    ("eval at IoU 0.5", fmt([100, 100, 300, 200]), GT, SQUARE, {**EGM_KWARGS, "reward_type": "eval"}, 1.0),
    ("eval at IoU 0.4", fmt([100, 100, 300, 180]), GT, SQUARE, {**EGM_KWARGS, "reward_type": "eval"}, 0.0),
    ("split test is always scored eval", fmt([100, 100, 300, 200]), GT, {**SQUARE, "split": "test"}, EGM_KWARGS,
     1.0),
    ("alpha 0.3, threshold 0.7", fmt([100, 100, 300, 200]), GT, SQUARE,
     {"reward_type": "mix", "alpha": 0.3, "threshold": 0.7}, 0.35),
    ("penalty: 601 words", "a b " * 300 + "[100, 100, 300, 300]", GT, SQUARE,
     {**EGM_KWARGS, "reward_type": "penalty"}, 0.98),
    ("penalty: a word 7 times in a row", "x x x x x x x [100, 100, 300, 300]", GT, SQUARE,
     {**EGM_KWARGS, "reward_type": "penalty"}, 0.7),
]


@pytest.mark.parametrize("text, truth, extra_info, kwargs, egm", [case[1:] for case in PARITY],
                         ids=[case[0] for case in PARITY])
def test_single_box_rows_score_as_egms_reward(text, truth, extra_info, kwargs, egm):
    # verl's call: everything by keyword, reward_kwargs merged in
    value = compute_score(data_source=SINGLE_SOURCE, solution_str=text, ground_truth=truth,
                          extra_info=dict(extra_info), **kwargs)
    assert value == pytest.approx(egm, abs=1e-12)


def test_the_issue_cases_now_agree_with_egm():
    """The three disagreements the issue found: fallback box, 5-number and 1-number last brackets."""
    assert compute_score("grounding", "it is at 100 100 300 300", GT, SQUARE) == 1.0
    assert compute_score("grounding", fmt(GT) + " [500, 500, 600, 600, 7]", GT, SQUARE) == 0.0
    assert compute_score("grounding", fmt(GT) + " [3]", GT, SQUARE) == 0.0


# --------------------------------------------------------------------------- deliberate deviations


def test_deviation_missing_reward_kwargs_use_egms_launch_values():
    # EGM raises ValueError("Missing required parameters: reward_type, alpha, threshold.")
    half = fmt([100, 100, 300, 200])
    assert compute_score("grounding", half, GT, SQUARE) == compute_score("grounding", half, GT, SQUARE, **EGM_KWARGS)
    assert compute_score("grounding", half, GT, SQUARE) == 0.75
    assert compute_score("grounding", half, GT, SQUARE, alpha=0.3) == pytest.approx(0.35 + 0.3)  # the rest default


def test_deviation_without_image_size_the_grid_is_used():
    # EGM raises ValueError("Height and width must be provided ..."); the export always writes both
    assert compute_score("grounding", fmt([0, 0, 140, 200]), [0, 0, 150, 200]) == pytest.approx(0.5 + 0.5 * 14 / 15)
    assert compute_score("grounding", fmt([0, 0, 140, 200]), [0, 0, 150, 200], {"width": 7, "height": 5}) == 1.0


def test_deviation_ground_truth_as_any_sequence():
    # EGM scores 0 unless the ground truth is a list or tuple; verl hands parquet lists over as lists
    assert compute_score("grounding", fmt(GT), np.array(GT), SQUARE) == 1.0


def test_deviation_unknown_reward_type_raises_even_without_a_box():
    # EGM raises only once a box was found (an answer without one returns 0 first)
    with pytest.raises(ValueError, match="unknown reward_type 'raw'"):
        compute_score("grounding", "no box", GT, SQUARE, reward_type="raw")


def test_deviation_a_sliver_at_the_far_edge_keeps_one_pixel():
    # EGM: [998, ..., 1000] on a 640-wide image rounds to x1 == x2 == 639 and stays zero-wide -> 0.0
    sliver = [998, 10, 1000, 500]
    assert compute_score("grounding", fmt(sliver), sliver, {"width": 640, "height": 480}) == 1.0
    assert reward.egm_pixels(sliver, 640, 480) == (638.0, 5.0, 639.0, 240.0)
    assert reward.egm_pixels([0, 0, 1, 1], 640, 480) == (0.0, 0.0, 1.0, 1.0)  # elsewhere: EGM's one pixel


def test_verl_extra_keys_are_ignored():
    info = {**SQUARE, "num_turns": 2, "rollout_reward_scores": {}, "id": "x", "question": "box"}
    assert compute_score("grounding", fmt(GT), GT, info, reward_router_address=None) == 1.0


# --------------------------------------------------------------------------- dispatch on data_source


def test_each_row_kind_has_its_own_reward_and_others_are_refused():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    both = answer([a, b])
    assert compute_score(MULTI_SOURCE, both, a + b, SQUARE) == 1.0
    assert compute_score(SINGLE_SOURCE, both, a + b, SQUARE) == 0.0  # EGM's reward on a multi row: 0
    assert compute_score(MULTI_SOURCE, answer([a]), a, SQUARE) == 1.0  # one box under the multi reward works too
    with pytest.raises(ValueError, match="openai/gsm8k"):
        compute_score("openai/gsm8k", both, a, SQUARE)
    assert reward.data_source_for(1) == SINGLE_SOURCE and reward.data_source_for(3) == MULTI_SOURCE


def test_multi_box_flat_and_nested_ground_truth_agree():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    flat, nested = a + b, [a, b]
    perfect = answer([b, a])  # order does not matter
    for truth in (flat, nested, np.array(flat)):
        assert compute_score(MULTI_SOURCE, perfect, truth, SQUARE) == 1.0


def test_multi_box_missing_and_extra_boxes_cost():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    assert compute_score(MULTI_SOURCE, answer([a]), a + b, SQUARE) == pytest.approx(0.5)
    extra = answer([a, b, [800, 0, 900, 100]])
    assert compute_score(MULTI_SOURCE, extra, a + b, SQUARE) == pytest.approx(2 / 3)
    assert compute_score(MULTI_SOURCE, "no boxes </think> []", a + b, SQUARE) == 0.0
    half = answer([[0, 0, 100, 50], b])  # IoU 0.5 and 1.0
    assert compute_score(MULTI_SOURCE, half, a + b, SQUARE) == pytest.approx((0.75 + 1.0) / 2)
    assert compute_score(MULTI_SOURCE, half, a + b, SQUARE, reward_type="eval") == 1.0


def test_multi_box_reads_the_answer_part_only():
    a, b = [0, 0, 100, 100], [500, 500, 700, 700]
    text = "Maybe [800, 800, 900, 900].\n</think>\n" + json.dumps([{"bbox_2d": a}, {"bbox_2d": b}])
    assert compute_score(MULTI_SOURCE, text, a + b, SQUARE) == 1.0


def test_unparseable_answers_score_zero():
    for text in ["", "I cannot find it.", "</think>\n\n```json\n[]\n```", None, 42]:
        assert compute_score(SINGLE_SOURCE, text, GT, SQUARE) == 0.0
        assert compute_score(MULTI_SOURCE, text, GT + GT, SQUARE) == 0.0


def test_truth_forms():
    assert truth_boxes([1, 2, 3, 4]) == [(1.0, 2.0, 3.0, 4.0)]
    assert len(truth_boxes(list(range(8)))) == 2
    assert truth_boxes([1, 2, 3]) == [] and truth_boxes("1,2,3,4") == [] and truth_boxes(None) == []
    assert egm_answer_box("x [1, 2, 3]") is None and egm_answer_box("[4, 3, 2, 1]") == (2.0, 1.0, 4.0, 3.0)


# --------------------------------------------------------------------------- how verl loads it


def test_the_file_loads_standalone_like_verl_does(tmp_path):
    copy = tmp_path / "reward.py"
    copy.write_text(open(reward.__file__).read())
    spec = importlib.util.spec_from_file_location("custom_reward", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.compute_score("grounding", answer([[1, 2, 30, 40]]), [1, 2, 30, 40], {"id": "x"},
                                reward_type="mix", alpha=0.5, threshold=0.5) == 1.0
    imports = [line for line in copy.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] in {"__future__", "math", "re", "typing"} for line in imports)


# --------------------------------------------------------------------------- the same geometry as egm.geometry

coord = st.floats(-200, 1200, allow_nan=False, allow_infinity=False)
any_box = st.tuples(coord, coord, coord, coord)  # unordered and degenerate boxes included


@hsettings(max_examples=300, deadline=None)
@given(a=any_box, b=any_box)
def test_iou_equals_egm_geometry(a, b):
    assert reward.iou(a, b) == Box(*a).iou(Box(*b))


@hsettings(max_examples=200, deadline=None)
@given(a=st.lists(any_box, max_size=5), b=st.lists(any_box, max_size=5))
def test_greedy_match_equals_egm_geometry(a, b):
    assert reward.greedy_match(a, b) == greedy_match([Box(*x) for x in a], [Box(*y) for y in b])


# two distinct sorted values per axis: every ordered box, drawn without filtering (a filter that drops
# three draws in four, over lists of up to four boxes, trips Hypothesis's filter_too_much health check)
_span = st.lists(st.integers(0, 1000), min_size=2, max_size=2, unique=True).map(sorted)
boxes = st.tuples(_span, _span).map(lambda xy: [xy[0][0], xy[1][0], xy[0][1], xy[1][1]])


@hsettings(max_examples=200, deadline=None)
@given(gt=st.lists(boxes, min_size=1, max_size=4), text=st.text(max_size=200),
       size=st.sampled_from([None, (640, 480), (7, 5)]))
def test_score_is_bounded_and_own_truth_is_perfect(gt, text, size):
    flat = [v for b in gt for v in b]
    source = reward.data_source_for(len(gt))
    info = {"width": size[0], "height": size[1]} if size else None
    value = compute_score(source, text, flat, info)
    assert 0.0 <= value <= 1.0 and not math.isnan(value)
    assert compute_score(source, answer(gt), flat, info) == pytest.approx(1.0)


def test_multi_box_score_is_egm_geometry_matching_on_many_random_boxes():
    """The stdlib copy scores several boxes exactly as egm.geometry would pair them (corners swapped,
    boxes outside the grid, ties and non-overlapping pairs included)."""
    import random

    rng = random.Random(16)

    def grid_box():
        return [rng.randint(-50, 1050) for _ in range(4)]

    for _ in range(500):
        answers = [grid_box() for _ in range(rng.randint(1, 5))]
        truth = [grid_box() for _ in range(rng.randint(1, 5))]
        text = "a reasoning [1, 2]\n</think>\n" + ", ".join(str(a) for a in answers)
        a = [Box(*[min(1000.0, max(0.0, float(v))) for v in b]).ordered() for b in answers]
        t = [Box(*map(float, b)).ordered() for b in truth]
        expected = sum(0.5 * (v >= 0.5) + 0.5 * v for _, _, v in greedy_match(a, t)) / max(len(a), len(t))
        got = compute_score(MULTI_SOURCE, text, [v for b in truth for v in b], reward_type="mix")
        assert got == pytest.approx(expected, abs=1e-12), (answers, truth)
