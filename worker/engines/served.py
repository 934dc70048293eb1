"""Small helpers shared by the served engines (OpenAI-compatible, vLLM): image fitting,
EGM text assembly and aligning per-token pieces with the completion text.

Pure functions, no heavy imports, so they are testable without a model.
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Sequence

from PIL import Image

THINK_END = "</think>"
THINK_START = "<think>"


def fitted_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most ``max_pixels`` pixels (never upscales)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max_pixels <= 0 or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    # float rounding can leave us one row/column over the cap
    while new_w * new_h > max_pixels and (new_w > 1 or new_h > 1):
        if new_w >= new_h:
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


def fit_within_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale ``image`` (keeping its aspect ratio) so it has at most ``max_pixels`` pixels.

    The model's processor resizes to its own cap anyway; doing it first saves bandwidth
    (a 40 MP photo is ~10 MB of JPEG) and processor CPU. Box coordinates are on the
    relative 0-1000 grid, so a uniform downscale does not change them.
    """
    size = fitted_size(image.width, image.height, max_pixels)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def join_reasoning(reasoning: str | None, content: str | None) -> str:
    """EGM text from a server's reasoning/content split: ``reasoning\\n</think>\\n\\n`` + content."""
    if not reasoning:
        return content or ""
    if content is None:
        # the model never closed its reasoning (truncated): there is no answer part
        return reasoning
    return reasoning.rstrip() + "\n" + THINK_END + "\n\n" + content.lstrip()


def pieces_from_bytes(chunks: Sequence[bytes]) -> list[str]:
    """Per-token text pieces from per-token UTF-8 bytes.

    A character split over several tokens is attributed to the token that completes it, so
    the pieces concatenate to the decoded text (token strings alone show U+FFFD for halves).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(chunk) for chunk in chunks]
    tail = decoder.decode(b"", final=True)
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces


_SPACE = re.compile(r"\s+")


def _squash(text: str) -> str:
    text = _SPACE.sub("", text)
    return text[len(THINK_START):] if text.startswith(THINK_START) else text


def align_pieces(
    text: str, pieces: Sequence[str], logprobs: Sequence[float]
) -> tuple[str, list[str], list[float]] | None:
    """Match per-token pieces to the completion ``text``.

    Returns ``(text, pieces, logprobs)`` whose pieces concatenate exactly to the returned text,
    or None when they cannot be matched. Tries, in order:

    * the pieces spell ``text``, possibly followed by tokens the text leaves out (the end-of-turn
      token is scored but not part of the text): those trailing tokens are dropped;
    * the pieces spell ``text`` up to whitespace and a leading ``<think>`` (a server's reasoning
      parser split and re-joined the text): the pieces' own text is returned, since it is the
      model's exact output.
    """
    if len(pieces) != len(logprobs):
        return None
    joined = ""
    for k in range(len(pieces) + 1):
        if joined == text:
            return text, list(pieces[:k]), list(logprobs[:k])
        if k < len(pieces):
            joined += pieces[k]
            if not text.startswith(joined):
                break
    target = _squash(text)
    if not target:
        return None
    joined = ""
    for k in range(len(pieces) + 1):
        squashed = _squash(joined)
        if squashed == target:
            return joined, list(pieces[:k]), list(logprobs[:k])
        if not target.startswith(squashed) and not THINK_START.startswith(_SPACE.sub("", joined)):
            break
        if k < len(pieces):
            joined += pieces[k]
    return None
