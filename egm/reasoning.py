"""The part of a model's reasoning that is about one label.

A prediction carries one reasoning text, written in one of two shapes:

* **per label** (``EGM_PROMPT_MODE=per_label``): one EGM answer per label, joined by the
  worker as ``"<label>: <reasoning>"`` blocks (a block may run over several lines);
* **one text for all labels** (``multi``, the default): the model reasons about every
  category of the multi-category prompt in one free text.

Training samples ask for one label at a time, and a box's per-region text in Label Studio
should speak of that box's label, so both need the label's own part:
:func:`reasoning_for_label`. Per-label text is cut by its prefixes. Free text is cut into
sentences; a sentence belongs to the labels it names (case-insensitive, whole words, a
plural ``s``/``es`` allowed, the longest label name winning where names overlap, as in
"square" / "green square"), and a sentence that names no label continues the one before
it ("It sits in the top left."). A text that names none of several labels belongs to none
of them: better no reasoning than reasoning about another object. With a single label the
whole text is that label's. ``aliases`` (other names -> label, e.g. a config's
``predicted_values``) count as mentions of their label: "a car" is about "Vehicle".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# Sentence ends: . ! ? followed by whitespace (so "0.5" and "e.g.5" stay whole), or a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


def reasoning_for_label(text: str, label: str, all_labels: Sequence[str] = (),
                        aliases: Mapping[str, str] | None = None) -> str:
    """The sentences (or per-label block) of ``text`` about ``label``; ``""`` when none are.

    ``all_labels`` are the labels the prompt asked about (the labeling config's labels);
    ``label`` counts as one of them either way. ``aliases``: other name -> the label it means.
    """
    text = (text or "").strip()
    if not text or not label.strip():
        return ""
    labels = _unique([label, *all_labels])
    blocks = _prefixed_blocks(text, labels)
    if blocks is not None:
        return "\n".join(body for name, body in blocks if name == label and body)
    if len(labels) == 1:
        return text
    return " ".join(_sentences_about(text, label, labels, _names(labels, aliases)))


def first_label_named(text: str, names: Sequence[str]) -> str | None:
    """The name of ``names`` that ``text`` mentions first (whole words, any case, plural ``s``/``es``;
    the longest name wins where names overlap: "green square" over "square"); ``None`` when none is.

    The same matching that assigns reasoning sentences to labels, for other readers of free text
    (e.g. the label of a typed referring expression: "the two yellow circles" -> "circle").
    """
    names = _unique(list(names))
    if not (text or "").strip() or not names:
        return None
    for match in _mention_pattern(names).finditer(text):
        name = _canonical(match.group(0), {n: n for n in names})
        if name is not None:
            return name
    return None


def in_label_blocks(text: str, all_labels: Sequence[str]) -> bool:
    """Whether ``text`` is in the worker's per-label ``"<label>: ..."`` form for these labels."""
    return _prefixed_blocks((text or "").strip(), _unique(list(all_labels))) is not None


def _unique(labels: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in labels:
        if name and name.strip() and name not in out:
            out.append(name)
    return out


def _prefixed_blocks(text: str, labels: list[str]) -> list[tuple[str | None, str]] | None:
    """``[(label, body)]`` when the text is in the worker's ``"<label>: ..."`` form, else None."""
    # longest first, so "green square: ..." is not read as "square"'s block when both exist
    names = sorted(labels, key=len, reverse=True)
    blocks: list[tuple[str | None, list[str]]] = []
    found = False
    for line in text.splitlines():
        owner = next((n for n in names if line.startswith(f"{n}: ")), None)
        if owner is not None:
            found = True
            blocks.append((owner, [line[len(owner) + 2:].strip()]))
        elif blocks:
            blocks[-1][1].append(line.strip())
        else:
            blocks.append((None, [line.strip()]))  # text before the first label: nobody's
    if not found:
        return None
    return [(name, "\n".join(part for part in lines if part)) for name, lines in blocks]


def _names(labels: list[str], aliases: Mapping[str, str] | None) -> dict[str, str]:
    """Every name that counts as a mention -> its label; a label's own name always means itself."""
    names = {alias: target for alias, target in (aliases or {}).items()
             if alias and alias.strip() and target in labels}
    names.update({name: name for name in labels})
    return names


def _sentences_about(text: str, label: str, labels: list[str], names: dict[str, str]) -> list[str]:
    pattern = _mention_pattern(list(names))
    kept: list[str] = []
    current: set[str] = set()
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        named = {_canonical(m.group(0), names) for m in pattern.finditer(sentence)}
        named.discard(None)
        if named:
            current = named  # type: ignore[assignment]
        if label in current:
            kept.append(sentence)
    return kept


def _mention_pattern(labels: list[str]) -> re.Pattern[str]:
    # longest names first: the regex alternation takes the first that matches at a position
    parts = [_name_regex(n) for n in sorted(labels, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?:e?s)?(?!\w)", re.IGNORECASE)


def _name_regex(name: str) -> str:
    words = [w for w in re.split(r"[\s_\-]+", name.strip()) if w]
    return r"[\s_\-]+".join(re.escape(w) for w in words)


def _canonical(mention: str, names: dict[str, str]) -> str | None:
    """The label a mention means (``names``: name -> label), longest name first."""
    key = _words(mention)
    for name in sorted(names, key=len, reverse=True):
        words = _words(name)
        if key == words or key in (words + "s", words + "es"):
            return names[name]
    return None


def _words(text: str) -> str:
    return " ".join(w.lower() for w in re.split(r"[\s_\-]+", text.strip()) if w)
