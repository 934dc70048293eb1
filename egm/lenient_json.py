"""A forgiving JSON reader that keeps character positions.

``json.loads`` gives values but no positions and gives up on the first flaw.
Model answers are often cut off (token limit), carry trailing commas, single
quotes, ``NaN`` or prose around the JSON, and the confidence score needs to know
*where* each coordinate sits in the text. This reader never raises: it turns
any text into a tree of :class:`Node` with character spans, marks what was cut
off (``complete=False``) and skips characters it cannot read.

It is used only by :mod:`egm.parsing`; nothing here knows about boxes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

NodeKind = Literal["list", "object", "string", "number", "word", "junk"]

#: a JSON-ish number; also accepts a leading ``+``, ``.5`` and ``5.``.
NUMBER_PATTERN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(NUMBER_PATTERN)
_FULL_NUMBER_RE = re.compile(r"\s*(" + NUMBER_PATTERN + r")\s*")
_WORD_RE = re.compile(r"-?[A-Za-z_][A-Za-z0-9_]*")
_SPACE_RE = re.compile(r"\s*")
_OPENER_RE = re.compile(r"[\[{]")
_BACKSLASH_RE = re.compile(r"\\(.)", re.DOTALL)

#: bare words that stand for numbers (Python's json writes NaN/Infinity).
_WORD_NUMBERS = {
    "nan": math.nan, "-nan": math.nan,
    "infinity": math.inf, "-infinity": -math.inf, "inf": math.inf, "-inf": -math.inf,
}

#: deeper nesting than this is read as junk; keeps recursion bounded on hostile input.
MAX_DEPTH = 64


@dataclass
class Node:
    """One value read from the text; ``start``/``end`` are offsets into the whole text."""

    kind: NodeKind
    start: int
    end: int
    #: False when the text ended before the closing bracket / quote.
    complete: bool = True
    items: list["Node"] = field(default_factory=list)
    members: list[tuple[str | None, "Node"]] = field(default_factory=list)
    #: decoded string, or the word as written.
    text: str = ""
    #: a string's characters between the quotes, as written (offsets of ``start + 1``).
    raw: str = ""
    #: value of a number (or of a numeric word such as ``NaN``).
    number: float | None = None

    def member(self, keys: frozenset[str]) -> "Node | None":
        """First member whose key (case-insensitive, stripped) is one of ``keys``."""
        for key, value in self.members:
            if key is not None and key.strip().lower() in keys:
                return value
        return None

    def children(self) -> list["Node"]:
        return self.items if self.kind == "list" else [v for _, v in self.members]


@dataclass
class NumberRef:
    """A number-like value with the span of its characters (digits, sign, dot)."""

    value: float
    start: int
    end: int
    #: the number was written inside a string (``"100"``).
    quoted: bool = False


def as_number(node: Node) -> NumberRef | None:
    """Read a node as a number: a number, a numeric word, or a complete string holding exactly one number."""
    if node.kind in ("number", "word") and node.number is not None:
        return NumberRef(node.number, node.start, node.end)
    if node.kind == "string" and node.complete:
        return _quoted_number(node)
    return None


def _quoted_number(node: Node) -> NumberRef | None:
    # Positions come from the raw characters between the quotes; digits never need escaping.
    m = _FULL_NUMBER_RE.fullmatch(node.raw)
    if m is None:
        return None
    raw_start = node.start + 1
    return NumberRef(_to_float(m.group(1)), raw_start + m.start(1), raw_start + m.end(1), quoted=True)


def numbers_in_string(node: Node) -> list[NumberRef]:
    """Every number written inside a string node (``"[100, 200, 300, 400]"``), with absolute spans."""
    base = node.start + 1
    return [
        NumberRef(_to_float(m.group()), base + m.start(), base + m.end(), quoted=True)
        for m in _NUMBER_RE.finditer(node.raw)
    ]


def _to_float(literal: str) -> float:
    # Huge literals become inf (float() does not raise on them); callers drop non-finite values.
    try:
        return float(literal)
    except (ValueError, OverflowError):
        return math.nan


@dataclass
class ReadResult:
    nodes: list[Node]
    #: the text ended inside a value (model hit its token limit).
    truncated: bool = False
    #: a ``]`` closed an object or a ``}`` closed a list.
    mismatched: bool = False


def read_values(text: str, start: int = 0, end: int | None = None) -> ReadResult:
    """Read every top-level ``[...]`` / ``{...}`` in ``text[start:end]``; prose between them is skipped."""
    reader = _Reader(text, start, len(text) if end is None else min(end, len(text)))
    return reader.read_all()


class _Reader:
    def __init__(self, text: str, start: int, end: int) -> None:
        self.text = text
        self.pos = max(0, start)
        self.end = end
        self.truncated = False
        self.mismatched = False

    def read_all(self) -> ReadResult:
        nodes: list[Node] = []
        while self.pos < self.end:
            m = _OPENER_RE.search(self.text, self.pos, self.end)
            if m is None:
                break
            self.pos = m.start()
            nodes.append(self.value(0))
        return ReadResult(nodes, self.truncated, self.mismatched)

    # --- helpers -------------------------------------------------------------

    def skip_space(self) -> None:
        m = _SPACE_RE.match(self.text, self.pos, self.end)
        if m is not None:
            self.pos = m.end()

    def skip_space_and_commas(self) -> None:
        while True:
            self.skip_space()
            if self.pos < self.end and self.text[self.pos] == ",":
                self.pos += 1
                continue
            return

    def junk(self) -> Node:
        node = Node("junk", self.pos, self.pos + 1)
        self.pos += 1
        return node

    # --- values --------------------------------------------------------------

    def value(self, depth: int) -> Node:
        """Read one value at ``self.pos`` (not whitespace); always advances at least one character."""
        c = self.text[self.pos]
        if c in "[{":
            if depth >= MAX_DEPTH:
                return self.junk()
            return self.list(depth) if c == "[" else self.object(depth)
        if c in "\"'":
            return self.string()
        m = _NUMBER_RE.match(self.text, self.pos, self.end)
        if m is not None:
            self.pos = m.end()
            return Node("number", m.start(), m.end(), text=m.group(), number=_to_float(m.group()))
        m = _WORD_RE.match(self.text, self.pos, self.end)
        if m is not None:
            self.pos = m.end()
            word = m.group()
            return Node("word", m.start(), m.end(), text=word, number=_WORD_NUMBERS.get(word.lower()))
        return self.junk()

    def list(self, depth: int) -> Node:
        node = Node("list", self.pos, self.pos)
        self.pos += 1
        while True:
            self.skip_space_and_commas()
            if self.pos >= self.end:
                node.complete = False
                self.truncated = True
                break
            c = self.text[self.pos]
            if c == "]":
                self.pos += 1
                break
            if c == "}":  # the enclosing object closes here; leave the brace to it
                self.mismatched = True
                break
            item = self.value(depth + 1)
            if item.kind != "junk":
                node.items.append(item)
        node.end = self.pos
        return node

    def object(self, depth: int) -> Node:
        node = Node("object", self.pos, self.pos)
        self.pos += 1
        while True:
            self.skip_space_and_commas()
            if self.pos >= self.end:
                node.complete = False
                self.truncated = True
                break
            c = self.text[self.pos]
            if c == "}":
                self.pos += 1
                break
            if c == "]":
                self.mismatched = True
                break
            self.member(node, depth)
        node.end = self.pos
        return node

    def member(self, node: Node, depth: int) -> None:
        """Read ``key: value`` into ``node.members``; tolerates a missing colon or value."""
        key_node = self.value(depth + 1)
        if key_node.kind == "junk":
            return
        self.skip_space()
        if self.pos >= self.end or self.text[self.pos] != ":":
            node.members.append((None, key_node))  # a value without a key
            return
        self.pos += 1
        self.skip_space()
        if self.pos >= self.end or self.text[self.pos] in ",}]":
            return  # key with no value (cut off, or ``"a": ,``)
        key = key_node.text if key_node.kind in ("string", "word") else None
        node.members.append((key, self.value(depth + 1)))

    def string(self) -> Node:
        quote = self.text[self.pos]
        i = self.pos + 1
        complete = False
        while i < self.end:
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                complete = True
                break
            i += 1
        i = min(i, self.end)
        raw = self.text[self.pos + 1:i]
        end = i + 1 if complete else i
        node = Node("string", self.pos, end, complete=complete, text=_decode(raw, quote), raw=raw)
        if not complete:
            self.truncated = True
        self.pos = node.end
        return node


def _decode(raw: str, quote: str) -> str:
    """Unescape a string body; falls back to dropping backslashes when it is not valid JSON."""
    if quote == '"':
        try:
            value = json.loads('"' + raw + '"', strict=False)
            if isinstance(value, str):
                return value
        except ValueError:
            pass
    return _BACKSLASH_RE.sub(r"\1", raw)
