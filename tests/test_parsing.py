"""EGM completion parser: literal completions (clean and broken) and property tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm.parsing import ParsedCompletion, ParseStatus, format_completion, parse_completion

OK, REPAIRED, NO_BOXES, UNPARSEABLE = (
    ParseStatus.ok, ParseStatus.repaired, ParseStatus.no_boxes, ParseStatus.unparseable,
)

FENCE = "```"


@dataclass
class Case:
    id: str
    text: str
    status: ParseStatus
    boxes: list[tuple[list[float], str | None]]
    reasoning: str | None = None
    #: substrings that must each appear in some note.
    notes: list[str] = field(default_factory=list)


def fenced(body: str, reasoning: str = "Thinking.") -> str:
    return f"{reasoning}\n</think>\n\n{FENCE}json\n{body}\n{FENCE}"


LADY = (
    "The lady in the blue shirt stands right of center, behind the table.\n</think>\n\n"
    "```json\n[\n\t{\"bbox_2d\": [444, 468, 757, 745], \"label\": \"lady with the blue shirt\"}\n]\n```"
)
LADY_REASONING = "The lady in the blue shirt stands right of center, behind the table."
LADY_BOX = ([444, 468, 757, 745], "lady with the blue shirt")

CASES = [
    # --- well-formed ------------------------------------------------------------
    Case("reference-example", LADY, OK, [LADY_BOX], LADY_REASONING),
    Case("leading-think-tag", "<think>\n" + LADY, OK, [LADY_BOX], LADY_REASONING),
    Case(
        "several-boxes",
        fenced('[\n\t{"bbox_2d": [10, 20, 110, 220], "label": "cat"},\n'
               '\t{"bbox_2d": [300, 310, 500, 620], "label": "dog"},\n'
               '\t{"bbox_2d": [700, 100, 990, 400], "label": "cat"}\n]', "Two cats and a dog."),
        OK,
        [([10, 20, 110, 220], "cat"), ([300, 310, 500, 620], "dog"), ([700, 100, 990, 400], "cat")],
        "Two cats and a dog.",
    ),
    Case("bbox-key", fenced('[{"bbox": [1, 2, 3, 4], "label": "cup"}]'), OK, [([1, 2, 3, 4], "cup")], "Thinking."),
    Case("upper-case-key", fenced('[{"BBOX_2D": [5, 6, 7, 8], "label": "cup"}]'), OK, [([5, 6, 7, 8], "cup")]),
    Case("no-label", fenced('[{"bbox_2d": [5, 6, 70, 80]}]'), OK, [([5, 6, 70, 80], None)]),
    Case("fence-without-language", "It is left.\n</think>\n\n```\n[{\"bbox_2d\": [0, 0, 500, 1000]}]\n```",
         OK, [([0, 0, 500, 1000], None)], "It is left."),
    Case("json-on-fence-line", 'ok</think>```json [{"bbox_2d": [9, 8, 70, 60], "label": "x"}]```',
         OK, [([9, 8, 70, 60], "x")], "ok"),
    Case("unicode-labels",
         fenced('[{"bbox_2d": [100, 100, 200, 200], "label": "猫"}, '
                '{"bbox_2d": [300, 300, 400, 400], "label": "café 🍰"}]', "两只动物。"),
         OK, [([100, 100, 200, 200], "猫"), ([300, 300, 400, 400], "café 🍰")], "两只动物。"),
    Case("escaped-quote-label", fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "the \\"big\\" dog"}]'),
         OK, [([1, 2, 3, 4], 'the "big" dog')]),
    Case("crlf", "A red car on the left.\r\n</think>\r\n\r\n```json\r\n[\r\n\t"
                 "{\"bbox_2d\": [12, 340, 298, 610], \"label\": \"red car\"}\r\n]\r\n```",
         OK, [([12, 340, 298, 610], "red car")], "A red car on the left."),
    Case("extra-text-after-fence",
         fenced('[{"bbox_2d": [50, 60, 70, 80], "label": "a"}]') + "\nNote: format is [1, 2, 3, 4].",
         OK, [([50, 60, 70, 80], "a")]),
    Case("zero-area-box-kept", fenced('[{"bbox_2d": [500, 500, 500, 500], "label": "dot"}]'),
         OK, [([500, 500, 500, 500], "dot")]),
    Case("multiline-reasoning", "<think>\nFirst line.\n\nSecond line.\n</think>\n\n```json\n"
                                "[{\"bbox_2d\": [1, 1, 2, 2]}]\n```",
         OK, [([1, 1, 2, 2], None)], "First line.\n\nSecond line."),
    # --- nothing found ---------------------------------------------------------
    Case("empty-list-fenced", fenced("[]", "No giraffe here."), NO_BOXES, [], "No giraffe here."),
    Case("empty-list-bare", "Nothing matches.\n</think>\n\n[]", NO_BOXES, [], "Nothing matches."),
    Case("cannot-find-sentence", "I looked everywhere.\n</think>\n\nI cannot find it in the image.",
         NO_BOXES, [], "I looked everywhere."),
    Case("null-answer", "Hmm.\n</think>\n\n```json\nnull\n```", NO_BOXES, [], "Hmm."),
    Case("empty-list-no-think", "No such object.\n```json\n[]\n```", NO_BOXES, [], "No such object.",
         ["missing </think>"]),
    # --- repaired: structure ----------------------------------------------------
    Case("missing-think-with-fence",
         "The dog is on the sofa.\n```json\n[{\"bbox_2d\": [100, 200, 300, 400], \"label\": \"dog\"}]\n```",
         REPAIRED, [([100, 200, 300, 400], "dog")], "The dog is on the sofa.", ["missing </think>"]),
    Case("missing-think-bare-json", 'Left one.\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]',
         REPAIRED, [([1, 2, 3, 4], "a")], "Left one.", ["missing </think>", "no code fence"]),
    Case("bare-json-only", '[{"bbox_2d": [11, 22, 33, 44]}]', REPAIRED, [([11, 22, 33, 44], None)], "",
         ["missing </think>"]),
    Case("no-fence-after-think", 'Center.\n</think>\n\n[{"bbox_2d": [400, 400, 600, 600], "label": "ball"}]',
         REPAIRED, [([400, 400, 600, 600], "ball")], "Center.", ["no code fence"]),
    Case("single-object", fenced('{"bbox_2d": [10, 20, 30, 40], "label": "sign"}'),
         REPAIRED, [([10, 20, 30, 40], "sign")], None, ["single object"]),
    Case("nested-junk",
         fenced('{"result": {"objects": [{"bbox_2d": [5, 5, 50, 50], "label": "x"}]}, "meta": [1, 2]}'),
         REPAIRED, [([5, 5, 50, 50], "x")], None, ["single object"]),
    Case("bare-list-of-lists", fenced("[[10, 20, 30, 40], [50, 60, 70, 80]]"),
         REPAIRED, [([10, 20, 30, 40], None), ([50, 60, 70, 80], None)], None, ["bare coordinate list"]),
    Case("bare-four-numbers", fenced("[100, 150, 300, 450]"), REPAIRED, [([100, 150, 300, 450], None)]),
    Case("bare-list-in-prose", "Found it.\n</think>\n\nThe box is [10, 20, 30, 40].",
         REPAIRED, [([10, 20, 30, 40], None)], "Found it.", ["bare coordinate list"]),
    Case("bare-list-under-other-key", fenced('[{"box": [1, 2, 3, 4], "label": "k"}]'),
         REPAIRED, [([1, 2, 3, 4], "k")]),
    Case("last-four-numbers", "Look.\n</think>\n\nIt spans x=100, y=150 to x=300, y=420.",
         REPAIRED, [([100, 150, 300, 420], None)], "Look.", ["last four numbers"]),
    Case("last-four-of-five", "Look.\n</think>\n\nCoordinates: 1 2 3 4 5", REPAIRED, [([2, 3, 4, 5], None)]),
    Case("nested-bbox-lists", fenced('[{"bbox_2d": [[1, 2, 3, 4], [5, 6, 7, 8]], "label": "tile"}]'),
         REPAIRED, [([1, 2, 3, 4], "tile"), ([5, 6, 7, 8], "tile")], None, ["nested"]),
    Case("trailing-comma", fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "a"},]'),
         REPAIRED, [([1, 2, 3, 4], "a")], None, ["malformed JSON"]),
    Case("single-quotes", fenced("[{'bbox_2d': [1, 2, 3, 4], 'label': 'a'}]"),
         REPAIRED, [([1, 2, 3, 4], "a")], None, ["malformed JSON"]),
    Case("mismatched-bracket", fenced('[{"bbox_2d": [1, 2, 3, 4}]'), REPAIRED, [([1, 2, 3, 4], None)], None,
         ["mismatched"]),
    Case("duplicates", fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}]'),
         REPAIRED, [([1, 2, 3, 4], "a")], None, ["duplicate"]),
    Case("same-box-other-label-kept",
         fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "b"}]'),
         OK, [([1, 2, 3, 4], "a"), ([1, 2, 3, 4], "b")]),
    Case("boxes-outside-empty-fence", "x\n</think>\n```json\n```\nThe answer: [1, 2, 3, 4]",
         REPAIRED, [([1, 2, 3, 4], None)], "x", ["outside the code fence"]),
    # --- repaired: truncation ---------------------------------------------------
    Case("truncated-mid-object",
         "Two.\n</think>\n\n```json\n[\n\t{\"bbox_2d\": [1, 2, 3, 4], \"label\": \"a\"},\n\t{\"bbox_2d\": [5, 6,",
         REPAIRED, [([1, 2, 3, 4], "a")], "Two.", ["truncated JSON", "cut off"]),
    Case("truncated-in-label",
         fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "do')
         .removesuffix("\n" + FENCE),
         REPAIRED, [([1, 2, 3, 4], "a"), ([5, 6, 7, 8], None)], None, ["label cut off", "truncated JSON"]),
    Case("truncated-after-list", "x</think>\n```json\n[\n\t{\"bbox_2d\": [1, 2, 3, 4], \"label\": \"a\"}\n]\n",
         REPAIRED, [([1, 2, 3, 4], "a")], "x", ["code fence not closed"]),
    Case("truncated-bare-lists", fenced("[[10, 20, 30, 40], [50, 60, 7").removesuffix("\n" + FENCE),
         REPAIRED, [([10, 20, 30, 40], None)], None, ["truncated JSON"]),
    # --- repaired: values --------------------------------------------------------
    Case("swapped-corners", fenced('[{"bbox_2d": [757, 745, 444, 468], "label": "lady"}]'),
         REPAIRED, [([444, 468, 757, 745], "lady")], None, ["corners swapped"]),
    Case("out-of-range", fenced('[{"bbox_2d": [-20, 50, 1100, 980]}]'),
         REPAIRED, [([0, 50, 1000, 980], None)], None, ["clamped"]),
    Case("floats", fenced('[{"bbox_2d": [100.4, 200.6, 300, 400.0]}]'),
         REPAIRED, [([100.4, 200.6, 300, 400], None)], None, ["non-integer"]),
    Case("numbers-as-strings", fenced('[{"bbox_2d": ["100", "200", "300", "400"], "label": "x"}]'),
         REPAIRED, [([100, 200, 300, 400], "x")], None, ["strings"]),
    Case("coordinates-as-one-string", fenced('[{"bbox_2d": "[100, 200, 300, 400]"}]'),
         REPAIRED, [([100, 200, 300, 400], None)], None, ["written as a string"]),
    Case("negative-in-bare-list", fenced("[-5, -10, 20, 30]"), REPAIRED, [([0, 0, 20, 30], None)], None,
         ["clamped"]),
    Case("nan-box-dropped-other-kept", fenced('[{"bbox_2d": [NaN, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]'),
         REPAIRED, [([5, 6, 7, 8], None)], None, ["non-finite"]),
    Case("wrong-arity-skipped", fenced('[{"bbox_2d": [1, 2, 3, 4, 5]}, {"bbox_2d": [5, 6, 7, 8]}]'),
         REPAIRED, [([5, 6, 7, 8], None)], None, ["5 values"]),
    # --- unparseable --------------------------------------------------------------
    Case("truncated-mid-number", fenced('[{"bbox_2d": [100, 200, 300, 4').removesuffix("\n" + FENCE),
         UNPARSEABLE, [], None, ["cut off", "truncated JSON"]),
    Case("only-nan", fenced('[{"bbox_2d": [NaN, 2, 3, Infinity]}]'), UNPARSEABLE, [], None, ["non-finite"]),
    Case("huge-number", fenced('[{"bbox_2d": [1e999, 2, 3, 4]}]'), UNPARSEABLE, [], None, ["non-finite"]),
    Case("three-values-no-fallback", fenced('[{"bbox_2d": [10, 20, 30], "label": "car 4"}]'),
         UNPARSEABLE, [], None, ["3 values"]),
    Case("prose-without-think", "The image shows a kitchen with 2 chairs.", UNPARSEABLE, [],
         "The image shows a kitchen with 2 chairs.", ["no answer"]),
    Case("cannot-find-without-think", "I cannot find it", UNPARSEABLE, [], "I cannot find it"),
    Case("reasoning-cut-off", "<think>\nThe man at 10, 20, 30, 40 is", UNPARSEABLE, [],
         "The man at 10, 20, 30, 40 is"),
    Case("box-only-in-reasoning", "It is at [1, 2, 3, 4].\n</think>\n", UNPARSEABLE, [], "It is at [1, 2, 3, 4]."),
    Case("prose-answer", "Hmm.\n</think>\n\nThe object is the red one.", UNPARSEABLE, [], "Hmm.",
         ["no box found"]),
    Case("empty-string", "", UNPARSEABLE, [], ""),
    Case("whitespace", " \n\t ", UNPARSEABLE, [], ""),
    Case("non-numeric-box", fenced('[{"bbox_2d": ["a", "b", "c", "d"]}]'), UNPARSEABLE, [], None, ["non-numeric"]),
]


def _grid(parsed: ParsedCompletion) -> list[tuple[list[float], str | None]]:
    return [(b.box.to_list(), b.label) for b in parsed.boxes]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_literal_completion(case: Case) -> None:
    parsed = parse_completion(case.text)
    assert parsed.status == case.status, parsed.notes
    assert _grid(parsed) == [([float(v) for v in coords], label) for coords, label in case.boxes]
    if case.reasoning is not None:
        assert parsed.reasoning == case.reasoning
    for expected in case.notes:
        assert any(expected in note for note in parsed.notes), (expected, parsed.notes)
    assert (parsed.status == OK) == (bool(parsed.boxes) and not parsed.notes)
    _assert_invariants(case.text, parsed)


def test_there_are_dozens_of_literal_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_span_covers_the_four_numbers() -> None:
    parsed = parse_completion(LADY)
    (box,) = parsed.boxes
    assert LADY[box.span[0]:box.span[1]] == "444, 468, 757, 745"
    assert [LADY[s:e] for s, e in box.value_spans] == ["444", "468", "757", "745"]
    assert box.repaired is False


def test_span_of_quoted_numbers_points_at_digits() -> None:
    text = fenced('[{"bbox_2d": ["100", "200", "300", "-4"]}]')
    (box,) = parse_completion(text).boxes
    assert text[box.span[0]:box.span[1]] == '100", "200", "300", "-4'
    assert box.repaired is True


def test_spans_of_several_boxes_are_their_own() -> None:
    text = fenced('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [50, 60, 70, 80], "label": "b"}]')
    spans = [text[b.span[0]:b.span[1]] for b in parse_completion(text).boxes]
    assert spans == ["1, 2, 3, 4", "50, 60, 70, 80"]


def test_fallback_span_covers_prose_numbers() -> None:
    text = "x</think>from (10, 20) to (30, 40)"
    (box,) = parse_completion(text).boxes
    assert text[box.span[0]:box.span[1]] == "10, 20) to (30, 40"


def test_answer_is_text_after_think() -> None:
    parsed = parse_completion(LADY)
    assert parsed.answer == (
        '```json\n[\n\t{"bbox_2d": [444, 468, 757, 745], "label": "lady with the blue shirt"}\n]\n```'
    )
    assert parsed.text == LADY


def test_answer_without_think_starts_at_json() -> None:
    parsed = parse_completion('Left one.\n[{"bbox_2d": [1, 2, 3, 4]}]')
    assert parsed.answer == '[{"bbox_2d": [1, 2, 3, 4]}]'


def test_per_box_repaired_flag() -> None:
    parsed = parse_completion(fenced('[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [30, 40, 10, 20]}]'))
    assert [b.repaired for b in parsed.boxes] == [False, True]
    assert parsed.notes == ["box 2: corners swapped"]


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["a"], {"bbox_2d": [1, 2, 3, 4]}])
def test_non_string_input_is_unparseable(value: object) -> None:
    parsed = parse_completion(value)  # type: ignore[arg-type]
    assert parsed.status == UNPARSEABLE
    assert parsed.boxes == []
    assert "not a string" in parsed.notes[0]


def test_deep_nesting_does_not_recurse_forever() -> None:
    text = "x</think>```json\n" + "[" * 50_000 + "1, 2, 3, 4" + "]" * 50_000 + "\n```"
    parsed = parse_completion(text)
    assert not any("internal" in n for n in parsed.notes)
    _assert_invariants(text, parsed)


def test_deep_nesting_with_a_shallow_box() -> None:
    text = "x</think>```json\n[" + "[" * 200 + "]" * 200 + ', {"bbox_2d": [1, 2, 3, 4]}]\n```'
    parsed = parse_completion(text)
    assert _grid(parsed) == [([1.0, 2.0, 3.0, 4.0], None)]


# --- format_completion -----------------------------------------------------------

def test_format_matches_sft_example() -> None:
    assert format_completion(LADY_REASONING, [([444, 468, 757, 745], "lady with the blue shirt")]) == LADY


def test_format_several_boxes_and_rounding() -> None:
    text = format_completion("r", [([1.4, 2.6, 3, 4], "a"), ([5, 6, 7, 8], None)])
    assert text == ('r\n</think>\n\n```json\n[\n\t{"bbox_2d": [1, 3, 3, 4], "label": "a"},\n'
                    '\t{"bbox_2d": [5, 6, 7, 8]}\n]\n```')


def test_format_empty_is_no_boxes() -> None:
    text = format_completion("Nothing.", [])
    assert text == "Nothing.\n</think>\n\n```json\n[]\n```"
    assert parse_completion(text).status == NO_BOXES


def test_format_rejects_wrong_arity() -> None:
    with pytest.raises(ValueError, match="4 coordinates"):
        format_completion("r", [([1, 2, 3], "a")])


_coord = st.integers(min_value=0, max_value=1000)
_box = st.tuples(_coord, _coord, _coord, _coord).map(
    lambda t: [min(t[0], t[2]), min(t[1], t[3]), max(t[0], t[2]), max(t[1], t[3])]
)
_label = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(blacklist_characters="`", blacklist_categories=("Cs",)), min_size=1, max_size=20)
    .filter(lambda s: s.strip() == s),
)
_reasoning = st.text(max_size=80).map(str.strip).filter(
    lambda s: "</think>" not in s and not s.startswith("<think>")
)
_boxes = st.lists(st.tuples(_box, _label), max_size=6).map(
    # identical (box, label) pairs are de-duplicated by the parser, so generate unique ones
    lambda items: list({(tuple(b), lab): (b, lab) for b, lab in items}.values())
)


@settings(max_examples=200, deadline=None)
@given(reasoning=_reasoning, boxes=_boxes)
def test_format_parse_round_trip(reasoning: str, boxes: list[tuple[list[int], str | None]]) -> None:
    text = format_completion(reasoning, boxes)
    parsed = parse_completion(text)
    assert parsed.reasoning == reasoning
    assert _grid(parsed) == [([float(v) for v in b], lab) for b, lab in boxes]
    assert parsed.status == (OK if boxes else NO_BOXES), parsed.notes


_safe_reasoning = st.text(alphabet="abcdefghij ,.", max_size=40).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(reasoning=_safe_reasoning, boxes=_boxes, data=st.data())
def test_truncation_only_recovers_complete_boxes(reasoning, boxes, data) -> None:
    """Cutting a completion anywhere never invents a box: each one found is one that was written."""
    text = format_completion(reasoning, boxes)
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    prefix = text[:cut]
    parsed = parse_completion(prefix)
    written = {(tuple(float(v) for v in b), lab) for b, lab in boxes}
    for box in parsed.boxes:
        coords = tuple(box.box.to_list())
        assert (coords, box.label) in written or any(c == coords for c, _ in written) and box.label is None
    _assert_invariants(prefix, parsed)


# --- never raises -------------------------------------------------------------------

_FRAGMENTS = [
    "[", "]", "{", "}", ",", ":", '"', "'", "```json\n", "```", "</think>", "<think>", '"bbox_2d"', '"bbox"',
    '"label"', ": ", "NaN", "-Infinity", "Infinity", "1e999", "-5", "0", "1000", "999", "12.5", ".5", "+3",
    "1e3", " ", "\n", "\r\n", "\t", "\\", '\\"', "abc", "猫", "null", "true", "-", "x1", "I cannot find it",
]
_jsonish = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.integers(-2000, 3000).map(str)), max_size=60).map(
    "".join
)


def _assert_invariants(text: str, parsed: ParsedCompletion) -> None:
    assert isinstance(parsed.status, ParseStatus)
    assert not any("internal parser error" in n for n in parsed.notes), parsed.notes
    assert bool(parsed.boxes) == (parsed.status in (OK, REPAIRED))
    for b in parsed.boxes:
        box = b.box
        assert box.is_ordered
        assert all(math.isfinite(v) and 0.0 <= v <= 1000.0 for v in box.to_list())
        start, end = b.span
        assert 0 <= start < end <= len(text)
        assert len(b.value_spans) == 4
        assert all(start <= s < e <= end for s, e in b.value_spans)


@settings(max_examples=400, deadline=None)
@given(text=st.text())
def test_any_text_never_raises(text: str) -> None:
    _assert_invariants(text, parse_completion(text))


@settings(max_examples=400, deadline=None)
@given(text=_jsonish)
def test_json_like_fragments_never_raise(text: str) -> None:
    _assert_invariants(text, parse_completion(text))


@settings(max_examples=200, deadline=None)
@given(body=_jsonish, reasoning=st.text(max_size=30))
def test_fenced_fragments_never_raise(body: str, reasoning: str) -> None:
    text = fenced(body, reasoning)
    _assert_invariants(text, parse_completion(text))
