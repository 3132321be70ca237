"""The cores' token bucket: refill on the given clock, a debt, and the instants it names."""

from __future__ import annotations

import pytest

from jvpn_trio.core.ratelimit import TokenBucket


def test_it_refills_at_its_rate_up_to_its_burst_and_never_backwards() -> None:
    bucket = TokenBucket.full(2.0, 3, now=10.0)
    assert [bucket.take(now=10.0) for _ in range(4)] == [True, True, True, False]
    bucket.refill(9.0)  # a now in the past changes nothing
    assert bucket.tokens == 0.0 and bucket.updated == 10.0
    assert bucket.empty(now=10.4) and not bucket.empty(now=10.5)
    bucket.refill(100.0)
    assert bucket.tokens == 3


def test_a_debt_says_when_the_next_token_and_a_full_bucket_are_there() -> None:
    bucket = TokenBucket.full(4.0, 2, now=0.0)
    bucket.spend()
    bucket.spend()
    bucket.spend()  # one token owed
    assert bucket.tokens == -1.0 and not bucket.has_token()
    assert bucket.token_at() == pytest.approx(0.5)  # 2 tokens to earn at 4/s
    assert bucket.full_at() == pytest.approx(0.75)
    assert bucket.reserve(now=0.5) == 0.0  # the token it waited for was there
    assert bucket.reserve(now=0.5) == pytest.approx(0.25)


def test_a_token_short_by_a_rounding_error_still_counts() -> None:
    bucket = TokenBucket(rate=3.0, burst=1, tokens=0.0, updated=0.0)
    bucket.refill(bucket.token_at())
    assert bucket.has_token()
