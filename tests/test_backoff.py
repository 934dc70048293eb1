"""The one backoff formula (egm.backoff)."""

from __future__ import annotations

from egm.backoff import backoff_s


def test_doubles_from_the_base_up_to_the_cap():
    assert [backoff_s(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_s(0, 1.0, 10.0) == 1.0  # "no retry yet" waits the base, never less
    assert backoff_s(10_000, 1.0, 15.0) == 15.0  # no overflow however long the outage


def test_jitter_only_shortens_by_at_most_its_fraction():
    assert backoff_s(3, 1.0, 60.0, jitter=0.5, rng=lambda: 0.0) == 4.0
    assert backoff_s(3, 1.0, 60.0, jitter=0.5, rng=lambda: 1.0) == 2.0
    assert backoff_s(3, 1.0, 60.0, jitter=0.1, rng=lambda: 0.5) == 3.8
