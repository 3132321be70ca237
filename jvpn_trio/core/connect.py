"""The client's first handshake: which path to try next, until when, and when to give up.

Theory of operation
-------------------
Before a session exists the client has only candidate paths and the
gateway's key.  :class:`HandshakePlanner` decides the order of attempts; the
driver sends one HANDSHAKE_INIT on the path it names, waits for an answer
until the attempt's ``deadline`` and then asks again with the current time.
Being a pure function of (candidates, link changes, policy, now), a run of
attempts can be asserted at exact virtual times.

- Paths are tried round robin in ``(priority, path id)`` order, one attempt
  per ``handshake_retry_ms``.
- A path whose link is known down is skipped, since each attempt costs a
  full retry interval; when every link is down the state we were told may be
  stale, so all paths are tried.
- No attempt starts once ``transport_loss_ttl_ms`` has passed since the
  start (the same bound after which a session without transport ends); an
  attempt that has started keeps its whole retry interval.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from jvpn_trio.core.ids import PathId
from jvpn_trio.core.policy import Policy
from jvpn_trio.core.states import ReasonCode

__all__ = ["HandshakeAttempt", "HandshakeCandidate", "HandshakeGiveUp", "HandshakePlanner", "HandshakeStep"]

_MS = 1000.0


@attrs.frozen(kw_only=True)
class HandshakeCandidate:
    """A path the handshake may use, with its link state when the client starts."""

    path: PathId
    priority: int
    link_up: bool = True


@attrs.frozen(kw_only=True)
class HandshakeAttempt:
    """Send the init on ``path`` now and wait for its answer until ``deadline``."""

    path: PathId
    deadline: float
    number: int  # 1 for the first attempt


@attrs.frozen(kw_only=True)
class HandshakeGiveUp:
    """No attempt may start any more: the handshake has failed."""

    reason: ReasonCode
    paths: tuple[PathId, ...]  # the paths it was trying, in priority order
    after_ms: int  # how long it tried


HandshakeStep = HandshakeAttempt | HandshakeGiveUp


class HandshakePlanner:
    """Plans the attempts of one initial handshake; see the module docstring.

    ``candidates`` must be non-empty with distinct paths (ValueError otherwise).
    """

    def __init__(self, *, policy: Policy, candidates: Iterable[HandshakeCandidate], now: float) -> None:
        ordered = sorted(candidates, key=lambda c: (c.priority, c.path.value))
        if not ordered:
            raise ValueError("a handshake needs at least one candidate path")
        if len({c.path for c in ordered}) != len(ordered):
            raise ValueError(f"candidate paths repeat: {[str(c.path) for c in ordered]}")
        self._order = tuple(c.path for c in ordered)
        self._link_up = {c.path: c.link_up for c in ordered}
        self._retry_s = policy.handshake_retry_ms / _MS
        self._ttl_ms = policy.transport_loss_ttl_ms
        self.give_up_at = now + policy.transport_loss_ttl_ms / _MS
        self._last: PathId | None = None
        self.attempts = 0

    def eligible(self) -> tuple[PathId, ...]:
        """The paths an attempt may use now, in priority order."""
        up = tuple(p for p in self._order if self._link_up[p])
        return up or self._order

    def link_changed(self, path: PathId, *, up: bool) -> None:
        """Netlink's news about a path's link; a path that is not a candidate is ignored."""
        if path in self._link_up:
            self._link_up[path] = up

    def next_attempt(self, *, now: float) -> HandshakeStep:
        """The attempt to make at ``now``, or the give-up once the TTL has passed."""
        eligible = self.eligible()
        if now >= self.give_up_at:
            return HandshakeGiveUp(
                reason=ReasonCode.TRANSPORT_LOSS_TTL_EXPIRED, paths=eligible, after_ms=self._ttl_ms
            )
        path = self._after(self._last, eligible)
        self._last = path
        self.attempts += 1
        return HandshakeAttempt(path=path, deadline=now + self._retry_s, number=self.attempts)

    def _after(self, last: PathId | None, eligible: tuple[PathId, ...]) -> PathId:
        """The first eligible path after ``last`` in priority order, wrapping around."""
        if last is None:
            return eligible[0]
        position = self._order.index(last)
        for path in eligible:
            if self._order.index(path) > position:
                return path
        return eligible[0]
