"""Confidence scores for EGM boxes: token log-probabilities and agreement between samples.

**Box score** - the geometric-mean probability of the tokens that wrote the box's coordinates::

    score(box) = exp( (1 / |T|) * sum_{t in T} log p(t) )

``T`` is the set of generated tokens whose characters overlap one of the box's four
numbers (``ParsedBox.value_spans``; the whole ``ParsedBox.span`` when those are absent).
Qwen tokenizers write one digit per token, so ``T`` is the digits (and signs/dots) of
``x1, y1, x2, y2``. Commas, brackets and spaces are left out: they are near-certain and
would pull every score towards 1. The score lies in [0, 1]; it is 1 when the model was
sure of every digit. Token offsets come from concatenating the generated token pieces,
which must reproduce the completion text (extra pieces after it, such as an end-of-turn
token, or before it are allowed); otherwise the score is ``None``.

**Task score** - the mean of the available box scores (``None`` when there is none)::

    task_score = (1 / |B|) * sum_{b in B} score(b)

The mean (not the minimum) keeps one hard box among many easy ones from flagging a
whole image; the per-box scores stay on each region for finer review triage.

**Sample agreement** (``sample_agreement``; used for active learning with K > 1 sampled
answers per image). With ``A`` the boxes of the first sample and ``B_k`` those of sample k::

    agreement = (1 / (K - 1)) * sum_{k=2..K} [ sum_{(i, j) in M_k} IoU(A_i, B_k,j) / max(|A|, |B_k|) ]

``M_k = egm.geometry.greedy_match(A, B_k)`` pairs boxes by descending IoU, each used once;
unmatched boxes count as IoU 0, and two empty answers agree fully (1). The value is in
[0, 1]: 1.0 = all K answers agree, lower = the model is unsure. Fewer than two samples
give 1.0 (nothing to disagree with).
"""

from __future__ import annotations

import math

from egm.geometry import Box, greedy_match
from egm.parsing import ParsedBox, ParsedCompletion


def box_scores(parsed: ParsedCompletion, tokens: list[str] | None,
               logprobs: list[float] | None) -> list[float | None]:
    """One score per box of ``parsed`` (same order); ``None`` where tokens are missing or misaligned."""
    offsets = _token_offsets(parsed.text, tokens, logprobs)
    if offsets is None or logprobs is None:
        return [None] * len(parsed.boxes)
    return [_score(_tokens_of(box, offsets), logprobs) for box in parsed.boxes]


def task_score(scores: list[float | None]) -> float | None:
    """Mean of the available box scores; ``None`` when no box has a score."""
    available = [s for s in scores if s is not None]
    return sum(available) / len(available) if available else None


def sample_agreement(samples: list[list[Box]]) -> float:
    """Agreement of K sampled answers with the first one, in [0, 1] (1.0 = all agree); see module doc."""
    if len(samples) < 2:
        return 1.0
    reference = samples[0]
    return sum(_answer_agreement(reference, other) for other in samples[1:]) / (len(samples) - 1)


def _answer_agreement(a: list[Box], b: list[Box]) -> float:
    if not a and not b:
        return 1.0
    matched = sum(iou for _, _, iou in greedy_match(a, b))
    return matched / max(len(a), len(b))


def _token_offsets(text: str, tokens: list[str] | None,
                   logprobs: list[float] | None) -> list[tuple[int, int]] | None:
    """Character span of each token in ``text`` coordinates, or ``None`` when they do not line up."""
    if tokens is None or logprobs is None or len(tokens) != len(logprobs):
        return None
    if not all(isinstance(t, str) for t in tokens):
        return None
    joined = "".join(tokens)
    shift = _text_position(joined, text)
    if shift is None:
        return None
    offsets: list[tuple[int, int]] = []
    pos = -shift
    for token in tokens:
        offsets.append((pos, pos + len(token)))
        pos += len(token)
    return offsets


def _text_position(joined: str, text: str) -> int | None:
    """Where ``text`` starts inside the concatenated tokens (0 when identical or followed by end tokens)."""
    if joined.startswith(text):
        return 0
    if not text:
        return None
    at = joined.find(text)
    return at if at >= 0 else None


def _tokens_of(box: ParsedBox, offsets: list[tuple[int, int]]) -> list[int]:
    """Indices of tokens overlapping the box's numbers."""
    spans = box.value_spans or (box.span,)
    return [
        i for i, (start, end) in enumerate(offsets)
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
    ]


def _score(indices: list[int], logprobs: list[float]) -> float | None:
    if not indices:
        return None
    values = [logprobs[i] for i in indices]
    if not all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
        return None
    mean = sum(values) / len(values)
    if math.isnan(mean):  # +inf and -inf together
        return None
    # log-probs are <= 0; positive values (numeric noise) must not give a score above 1.
    return math.exp(min(0.0, mean))
