"""Box scores from token log-probabilities, task score, and agreement between sampled answers."""

from __future__ import annotations

import math

import pytest

from egm.confidence import box_scores, sample_agreement, task_score
from egm.geometry import Box
from egm.parsing import ParsedBox, ParsedCompletion, ParseStatus, parse_completion

#: a completion split into token pieces the way a Qwen tokenizer would (one digit per token).
#: ``None`` marks a coordinate digit; its log-prob is given per test.
PIECES = [
    "ok", "\n", "</think>", "\n\n", "```", "json", "\n", '[{"', "bbox", "_", "2", "d", '":', " [",
    None, None, ",", " ", None, ",", " ", None, None, ",", " ", None, None, "],", ' "', "label", '":', ' "', "a",
    '"}', "]\n", "```",
]
DIGITS = ["1", "2", "5", "3", "0", "4", "0"]  # box [12, 5, 30, 40]
SEPARATOR_LOGPROB = -3.0  # low on purpose: must not leak into the box score


def tokens_with(digit_logprobs: list[float]) -> tuple[list[str], list[float]]:
    digits = iter(zip(DIGITS, digit_logprobs, strict=True))
    tokens: list[str] = []
    logprobs: list[float] = []
    for piece in PIECES:
        if piece is None:
            digit, lp = next(digits)
            tokens.append(digit)
            logprobs.append(lp)
        else:
            tokens.append(piece)
            logprobs.append(SEPARATOR_LOGPROB)
    return tokens, logprobs


TOKENS, _ = tokens_with([0.0] * 7)
TEXT = "".join(TOKENS)


def test_hand_built_completion_parses_as_expected() -> None:
    parsed = parse_completion(TEXT)
    assert parsed.status == ParseStatus.ok
    assert [b.box.to_list() for b in parsed.boxes] == [[12.0, 5.0, 30.0, 40.0]]


def test_geometric_mean_of_digit_tokens() -> None:
    tokens, logprobs = tokens_with([math.log(0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    (score,) = box_scores(parse_completion(TEXT), tokens, logprobs)
    assert score == pytest.approx(0.5 ** (1 / 7))


def test_separators_do_not_count() -> None:
    tokens, logprobs = tokens_with([0.0] * 7)
    assert box_scores(parse_completion(TEXT), tokens, logprobs) == [1.0]


def test_mixed_digit_logprobs() -> None:
    lps = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]
    tokens, logprobs = tokens_with(lps)
    (score,) = box_scores(parse_completion(TEXT), tokens, logprobs)
    assert score == pytest.approx(math.exp(-2.8 / 7))


def test_two_boxes_get_their_own_tokens() -> None:
    pieces = ["r", "</think>", "[[", "1", "0", ", ", "2", ", ", "3", ", ", "4", "], [", "5", ", ", "6", ", ", "7",
              ", ", "8", "]]"]
    logprobs = [0.0] * len(pieces)
    logprobs[3] = math.log(0.25)  # "1" of the first box
    logprobs[12] = math.log(0.9)  # "5" of the second box
    parsed = parse_completion("".join(pieces))
    assert len(parsed.boxes) == 2
    first, second = box_scores(parsed, pieces, logprobs)
    assert first == pytest.approx(0.25 ** (1 / 5))  # digits 1, 0, 2, 3, 4
    assert second == pytest.approx(0.9 ** (1 / 4))


def test_token_covering_two_numbers_counts_once() -> None:
    pieces = ["r", "</think>", "[", "100", ", 2", "00, 3", "00, 4", "00", "]"]
    logprobs = [-9.0, -9.0, -9.0, math.log(0.8), math.log(0.5), math.log(0.5), math.log(0.5), 0.0, -9.0]
    parsed = parse_completion("".join(pieces))
    (score,) = box_scores(parsed, pieces, logprobs)
    expected = math.exp((math.log(0.8) + 3 * math.log(0.5) + 0.0) / 5)
    assert score == pytest.approx(expected)


def test_trailing_end_token_is_allowed() -> None:
    tokens, logprobs = tokens_with([math.log(0.5)] * 7)
    (score,) = box_scores(parse_completion(TEXT), tokens + ["<|im_end|>"], logprobs + [-0.01])
    assert score == pytest.approx(0.5)


def test_leading_token_outside_text_is_allowed() -> None:
    tokens, logprobs = tokens_with([math.log(0.25)] * 7)
    (score,) = box_scores(parse_completion(TEXT), ["<think>\n"] + tokens, [-0.5] + logprobs)
    assert score == pytest.approx(0.25)


def test_box_without_value_spans_uses_the_whole_span() -> None:
    text = "a</think>[1, 2, 3, 4]"
    pieces = ["a", "</think>", "[", "1", ", ", "2", ", ", "3", ", ", "4", "]"]
    logprobs = [0.0, 0.0, 0.0, 0.0, math.log(0.1), 0.0, math.log(0.1), 0.0, math.log(0.1), 0.0, 0.0]
    box = ParsedBox(Box(1, 2, 3, 4), None, (10, 20))
    parsed = ParsedCompletion("a", [box], ParseStatus.repaired, [], "[1, 2, 3, 4]", text)
    (score,) = box_scores(parsed, pieces, logprobs)
    assert score == pytest.approx(0.1 ** (3 / 7))


@pytest.mark.parametrize(
    ("tokens", "logprobs"),
    [
        (None, [0.0]),
        (TOKENS, None),
        (None, None),
        (TOKENS, [0.0] * (len(TOKENS) - 1)),  # length mismatch
        (TOKENS[:-1], [0.0] * (len(TOKENS) - 1)),  # text cut short
        ([t.upper() for t in TOKENS], [0.0] * len(TOKENS)),  # different text
        (TOKENS[:10] + ["X"] + TOKENS[10:], [0.0] * (len(TOKENS) + 1)),  # an extra piece in the middle
    ],
    ids=["no-tokens", "no-logprobs", "neither", "length-mismatch", "short", "other-text", "inserted-piece"],
)
def test_missing_or_misaligned_tokens_give_none(tokens, logprobs) -> None:
    assert box_scores(parse_completion(TEXT), tokens, logprobs) == [None]


def test_no_boxes_gives_empty_list() -> None:
    assert box_scores(parse_completion("x</think>[]"), ["x", "</think>", "[]"], [0.0, 0.0, 0.0]) == []


def test_minus_infinity_gives_zero() -> None:
    tokens, logprobs = tokens_with([-math.inf] + [0.0] * 6)
    assert box_scores(parse_completion(TEXT), tokens, logprobs) == [0.0]


def test_nan_logprob_gives_none() -> None:
    tokens, logprobs = tokens_with([math.nan] + [0.0] * 6)
    assert box_scores(parse_completion(TEXT), tokens, logprobs) == [None]


def test_positive_logprob_is_capped_at_one() -> None:
    tokens, logprobs = tokens_with([1e-6] * 7)
    assert box_scores(parse_completion(TEXT), tokens, logprobs) == [1.0]


def test_scores_are_probabilities() -> None:
    tokens, logprobs = tokens_with([-0.01, -2.0, -7.5, -0.3, -1e-4, -12.0, -0.9])
    (score,) = box_scores(parse_completion(TEXT), tokens, logprobs)
    assert score is not None and 0.0 < score < 1.0


# --- task score ---------------------------------------------------------------------

def test_task_score_is_mean_of_available() -> None:
    assert task_score([0.5, None, 1.0]) == pytest.approx(0.75)
    assert task_score([0.2]) == pytest.approx(0.2)


@pytest.mark.parametrize("scores", [[], [None], [None, None]])
def test_task_score_none_without_scores(scores) -> None:
    assert task_score(scores) is None


# --- agreement between samples ----------------------------------------------------------

A = Box(0, 0, 10, 10)
B_HALF = Box(5, 0, 15, 10)  # IoU with A = 50 / 150
C = Box(500, 500, 600, 600)


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], 1.0),
        ([[A]], 1.0),
        ([[A], [A], [A]], 1.0),
        ([[], []], 1.0),
        ([[A], []], 0.0),
        ([[], [A]], 0.0),
        ([[A], [C]], 0.0),
        ([[A], [B_HALF]], 1 / 3),
        ([[A], [A], [B_HALF]], (1 + 1 / 3) / 2),
        ([[A, C], [A]], 0.5),
        ([[A, C], [C, A]], 1.0),  # order does not matter
        ([[A, C], [B_HALF, C]], (1 / 3 + 1) / 2),
    ],
    ids=["none", "one", "identical", "both-empty", "second-empty", "first-empty", "disjoint", "half",
         "three-samples", "missing-box", "reordered", "multi-partial"],
)
def test_sample_agreement(samples, expected) -> None:
    assert sample_agreement(samples) == pytest.approx(expected)
