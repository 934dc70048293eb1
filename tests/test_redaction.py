"""One redaction module, one URL policy: free text and single URLs are masked alike."""

from __future__ import annotations

import pytest

from egm.redaction import redact, redact_secrets, redact_url


@pytest.mark.parametrize("url", [
    "https://alice:S3cretPass@h.example/a.jpg?token=T0kenValue&d=x/y.jpg#frag",
    "redis://:S3cretPass@redis:6379/0",
    "http://h.example/data/local-files/?d=photos/a.jpg&sig=T0kenValue",
])
def test_urls_in_text_follow_the_url_policy(url):
    text = f"GET {url} failed (503)."
    out = redact(text)
    assert "S3cretPass" not in out and "T0kenValue" not in out and "alice" not in out
    assert out == f"GET {redact_url(url, max_len=None)} failed (503)."


def test_harmless_parts_stay_readable():
    assert redact("GET http://ls:8080/api/tasks/3 took 12 ms") == "GET http://ls:8080/api/tasks/3 took 12 ms"
    assert "d=photos/a.jpg" in redact("http://ls/data/local-files/?d=photos/a.jpg")
    assert redact("see (http://u:pw-long@h/x).") == "see (http://***@h/x)."


def test_known_secrets_and_credential_pairs():
    assert redact("key sk-0123456789 sent", ["sk-0123456789"]) == "key *** sent"
    assert redact_secrets("a b c", ["b"]) == "a b c"  # too short to be a secret worth masking
    assert "hunter2-horse" not in redact('{"password": "hunter2-horse"}')
    assert redact("Authorization: Bearer abc.def.ghi") == "Authorization: Bearer ***"
