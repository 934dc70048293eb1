"""Redaction: the one place that decides what of a secret or a URL may be shown.

Everything that leaves the process - log lines, error messages published in Redis or
returned to Label Studio, one-line CLI errors - goes through these functions:

* :func:`redact_secrets` - known secrets (API keys, passwords from the settings, a
  client's own token) become ``***``; strings shorter than 4 characters are left alone
  (they would blank out ordinary words).
* :func:`redact_url` - **the URL policy**: no userinfo (``https://***@host``), no
  fragment, every query value ``***`` except keys known to be harmless (``d``, Label
  Studio's local-files path); ``data:`` URLs show their header and length only.
* :func:`redact` - free text: known secrets, then every URL in the text under the URL
  policy above, then credential-looking pieces (``Authorization`` headers,
  ``"password": ...`` pairs).
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"
#: Query keys whose values are never secret and help to read an error (Label Studio's local-files path).
SAFE_QUERY_KEYS = frozenset({"d"})
#: Secrets shorter than this are not replaced (they would blank out ordinary words).
MIN_SECRET_LEN = 4

_CREDENTIALS = [
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(token|bearer|basic)\s+[^\s\"',}]+"), r"\1\2 ***"),
    (re.compile(r"(?i)(\"?(?:password|api_key|access_token|refresh|token)\"?\s*[:=]\s*\"?)(?!\*\*\*)[^\s\",}&]{6,}"), r"\1***"),
]
_URL_IN_TEXT = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'<>`]+")
_TRAILING = ".,;:)]}"


def redact_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LEN:
            text = text.replace(secret, MASK)
    return text


def redact_url(url: str, max_len: int | None = 200) -> str:
    """The URL without userinfo, fragment or query values (except harmless keys), for messages and logs."""
    text = str(url).strip()
    if text[:5].lower() == "data:":
        return f"{text.partition(',')[0]},... ({len(text)} chars)"
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = MASK + "@" + netloc.rpartition("@")[2]
        query = "&".join(
            f"{quote(k, safe='')}={quote(v, safe='/') if k in SAFE_QUERY_KEYS else MASK}"
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        )
        out = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<malformed URL>"
    return out if max_len is None or len(out) <= max_len else out[: max_len - 3] + "..."


def _url_in_text(match: re.Match) -> str:
    url = match.group(0)
    tail = ""
    while url and url[-1] in _TRAILING:
        url, tail = url[:-1], url[-1] + tail
    try:
        parts = urlsplit(url)
        plain = "@" not in parts.netloc and not parts.query and not parts.fragment
    except ValueError:
        plain = False
    return (url if plain else redact_url(url, max_len=None)) + tail


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secrets, credential-looking pieces and URL secrets masked (see module doc)."""
    text = _URL_IN_TEXT.sub(_url_in_text, redact_secrets(text, secrets))
    for pattern, repl in _CREDENTIALS:
        text = pattern.sub(repl, text)
    return text
