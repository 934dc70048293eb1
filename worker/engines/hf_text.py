"""Generated token ids -> text pieces whose concatenation is exactly the answer text.

Confidence scores map token log-probs onto spans of the answer (`egm/confidence.py`), so the
engine must return one text piece per generated token and those pieces must add up to the
text character for character. Decoding each token alone breaks characters that span tokens
(byte-level BPE splits UTF-8 sequences), and decoding every prefix is quadratic. Instead the
ids are turned back into bytes and run through one incremental UTF-8 decoder: a token that
ends inside a character yields "", the token that completes it yields the character.

Special tokens are dropped (empty piece, so pieces stay aligned with log-probs), except the
think tags: ``</think>`` separates EGM's reasoning from its answer and must stay in the text.
Ids the tokenizer does not know (a random full-size model can emit any of 151,936) become
U+FFFD instead of crashing.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Any

KEEP_TOKENS = ("<think>", "</think>")
REPLACEMENT = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: every byte gets a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return False
    return "ByteLevel" in repr(decoder) or type(decoder).__name__ == "ByteLevel"


class TokenTextDecoder:
    """Decodes generated ids of one tokenizer into aligned text pieces."""

    def __init__(self, tokenizer: Any, keep_tokens: Iterable[str] = KEEP_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        vocab: dict[str, int] = tokenizer.get_vocab()
        self._token_of_id: dict[int, str] = {i: t for t, i in vocab.items()}
        keep = {tokenizer.convert_tokens_to_ids(t) for t in keep_tokens if t in vocab}
        self._dropped: set[int] = set(tokenizer.all_special_ids) - keep
        # Added tokens (specials, think tags) are stored as their literal text, not byte-level.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._literal: dict[int, str] = {i: tok.content for i, tok in added.items() if i not in self._dropped}
        for i in keep:
            self._literal.setdefault(i, self._token_of_id[i])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """One text piece per id; ``"".join(pieces)`` is the decoded text."""
        if not self.byte_level:
            return [self._piece_alone(i) for i in ids]
        pieces: list[str] = []
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            i = int(i)
            if i in self._dropped:
                pieces.append("")
                continue
            literal = self._literal.get(i)
            raw = None if literal is not None else self._bytes(i)
            if raw is None:
                # a literal token or an unknown id ends any half-decoded character first
                flushed = utf8.decode(b"", final=True)
                utf8.reset()
                pieces.append(flushed + (literal if literal is not None else REPLACEMENT))
            else:
                pieces.append(utf8.decode(raw))
        tail = utf8.decode(b"", final=True)
        if tail:
            pieces[-1] += tail
        return pieces

    def text(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces(ids))

    def _bytes(self, i: int) -> bytes | None:
        token = self._token_of_id.get(i)
        if token is None:
            return None
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        except KeyError:  # not a byte-level string: treat like an unknown id
            return None

    def _piece_alone(self, i: int) -> str:
        i = int(i)
        if i in self._dropped:
            return ""
        if i not in self._token_of_id:
            return REPLACEMENT
        return self.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
