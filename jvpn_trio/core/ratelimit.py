"""A token bucket with an injected clock: the one rate limiter of the cores.

Used for handshake admission (``core/cookie.py``) and for the event log's security lines
(``core/loglimit.py``).  ``rate`` tokens a second accrue up to ``burst``; time is whatever
``now`` the caller passes (monotonic seconds), so decisions replay.
"""

from __future__ import annotations

import attrs

#: Tokens are floats: a bucket refilled exactly at the time it said a token would be back may fall
#: short by a rounding error; this much short still counts as a token (so a deadline is never stuck).
ROUNDING = 1e-9


@attrs.define
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``tokens`` as of ``updated``."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, *, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def refill(self, now: float) -> None:
        """Add what accrued since ``updated`` (a ``now`` in the past changes nothing)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def has_token(self) -> bool:
        """Whether a whole token is there as of the last refill (takes nothing)."""
        return self.tokens >= 1.0 - ROUNDING

    def empty(self, *, now: float) -> bool:
        """Whether no whole token is there at ``now`` (takes nothing)."""
        self.refill(now)
        return not self.has_token()

    def take(self, *, now: float) -> bool:
        """Take one token if there is one."""
        self.refill(now)
        if self.has_token():
            self.tokens -= 1.0
            return True
        return False

    def spend(self) -> None:
        """Take one token whether or not it is there: the bucket may go below zero (a debt)."""
        self.tokens -= 1.0

    def reserve(self, *, now: float) -> float:
        """Take the next token, even one not there yet: seconds until it is (0: it was there).

        For one consumer that waits that long before it acts (a debt of at most one token).
        """
        self.refill(now)
        self.spend()
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate

    def token_at(self) -> float:
        """When the next whole token is there (``updated`` if it is already)."""
        return self.updated + max(0.0, 1.0 - self.tokens) / self.rate

    def full_at(self) -> float:
        """When the bucket is full again."""
        return self.updated + (self.burst - self.tokens) / self.rate
