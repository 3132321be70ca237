"""Anti-replay: a sliding-window bitmap for transport counters, monotonic reattach nonces.

Theory of operation
-------------------
**Transport counters** (spec 9, wireguard-go's ``replay/``).  Every transport
message carries a 64-bit counter that the sender increments, one counter per
lane (``core/keyring.py``), so the receiver keeps one window per lane.  The receiver keeps the
highest counter it has accepted and a bitmap of which recent counters it has
seen, laid out as RFC 6479 describes: a ring of ``size_packets / 64`` blocks
of 64 bits each.  Moving the window forward only clears the blocks it slides
over (at most the whole ring, however far the jump), so both the check and
the update cost O(1) amortised, with no bit shifting of the whole map.

The ring cannot hold a full ``size_packets`` counters behind the highest one:
the block holding the highest counter is only partly used, and which part
depends on where in its block that counter falls.  Rather than let the
acceptance rule wobble with that position, the age test is done in
arithmetic, against a fixed *effective window* of ``W = size_packets - 64``
counters (one block less than the ring; the ring always covers it)::

    accept(c)  iff  0 <= c < COUNTER_LIMIT
               and  c has not been accepted before
               and  (nothing accepted yet  or  c > highest - W)

so the highest accepted counter and the ``W - 1`` below it are in the window,
and anything newer is always in.  ``tests/properties/test_replay_model.py``
checks this sentence, word for word, against a Python set.

The API is two-step, as WireGuard's receive path needs (STYLE.md: "AEAD open,
then the replay window"): :meth:`ReplayWindow.check` is pure and cheap, so an
obvious replay is dropped before paying for decryption; :meth:`commit` runs
only once the packet has authenticated, and is the only call that moves the
window (a forged packet with a huge counter must not be able to slide it).
``commit`` re-checks, so a duplicate that raced past ``check`` still fails.

**Reattach nonces** (Property 7).  A REATTACH_REQUEST is fresh only when its
nonce is strictly above the last accepted one.  :class:`NonceState` is a
frozen value: validation asks :meth:`NonceState.is_fresh` and the session
commits :meth:`NonceState.accepted` together with the rest of the
transition, so a rejected (replayed) request cannot mutate anything.
"""

from __future__ import annotations

from typing import Literal

import attrs

#: Bits per ring block (RFC 6479 uses machine words; ours are 64-bit).
BLOCK_BITS = 64
#: The smallest ring we allow: what ``Policy.replay_window_packets`` allows,
#: and comfortably above WireGuard's 2048-counter window for reordering links.
MIN_WINDOW_PACKETS = 2048
#: Counters are 64-bit and the value ``2**64 - 1`` is never valid (as in
#: wireguard-go, whose nonce space ends one below it): accepted counters are
#: ``0 <= c < COUNTER_LIMIT``.
COUNTER_LIMIT = (1 << 64) - 1

_Rejection = Literal["out_of_range", "too_old", "replay"]


@attrs.frozen(kw_only=True)
class ReplayStatistics:
    """What the window has decided so far (trio-style ``statistics()`` record).

    Only :meth:`ReplayWindow.commit` counts; ``check`` is pure.
    """

    accepted: int
    rejected_replay: int
    rejected_too_old: int
    rejected_out_of_range: int
    highest_accepted: int | None
    window_packets: int


class ReplayWindow:
    """Sliding-window replay filter for one receive key (RFC 6479 layout).

    ``size_packets`` is the ring size in counters: a multiple of 64 and at
    least 2048 (ValueError otherwise).  The effective window is
    ``size_packets - 64`` counters; see the module docstring.
    """

    def __init__(self, size_packets: int) -> None:
        if not isinstance(size_packets, int) or isinstance(size_packets, bool):
            raise ValueError(f"size_packets must be an int, got {type(size_packets).__name__}")
        if size_packets < MIN_WINDOW_PACKETS:
            raise ValueError(f"size_packets must be at least {MIN_WINDOW_PACKETS}, got {size_packets}")
        if size_packets % BLOCK_BITS:
            raise ValueError(f"size_packets must be a multiple of {BLOCK_BITS}, got {size_packets}")
        self._size = size_packets
        self._blocks = size_packets // BLOCK_BITS
        self._window = size_packets - BLOCK_BITS
        self._ring = [0] * self._blocks
        # ``_highest`` starts at 0 with an empty ring: every valid counter is
        # then "newer than highest - W" and unseen, which is exactly "nothing
        # accepted yet", without a special case on the hot path.
        self._highest = 0
        self._any_accepted = False
        self._accepted = 0
        self._rejected_replay = 0
        self._rejected_too_old = 0
        self._rejected_out_of_range = 0

    @property
    def size_packets(self) -> int:
        """The ring size in counters, as configured."""
        return self._size

    @property
    def window(self) -> int:
        """The effective window ``W``: how many counters up to the highest are still acceptable."""
        return self._window

    def _slot(self, counter: int) -> tuple[int, int]:
        return (counter // BLOCK_BITS) % self._blocks, 1 << (counter % BLOCK_BITS)

    def _classify(self, counter: int) -> _Rejection | None:
        """None if acceptable, else which rejection counter it belongs to.  Pure."""
        if not 0 <= counter < COUNTER_LIMIT:
            return "out_of_range"
        if counter > self._highest:
            return None  # newer than anything seen: never a replay
        if self._highest - counter >= self._window:
            return "too_old"
        block, bit = self._slot(counter)
        if self._ring[block] & bit:
            return "replay"
        return None

    def check(self, counter: int) -> bool:
        """Would ``commit(counter)`` accept?  Pure: call it before the AEAD open."""
        if self._highest < counter < COUNTER_LIMIT:  # in order: the common case, decided at once
            return True
        return self._classify(counter) is None

    def commit(self, counter: int) -> bool:
        """Accept ``counter`` and mark it seen; False (and nothing but a statistic changes) if not.

        Call only after the packet authenticated: this is what moves the window.
        """
        if self._highest < counter < COUNTER_LIMIT:  # newer than anything seen: never a replay
            self._advance(counter)
            self._ring[(counter // BLOCK_BITS) % self._blocks] |= 1 << (counter % BLOCK_BITS)
            self._any_accepted = True
            self._accepted += 1
            return True
        verdict = self._classify(counter)
        if verdict == "out_of_range":
            self._rejected_out_of_range += 1
            return False
        if verdict == "too_old":
            self._rejected_too_old += 1
            return False
        if verdict == "replay":
            self._rejected_replay += 1
            return False
        if counter > self._highest:
            self._advance(counter)
        block, bit = self._slot(counter)
        self._ring[block] |= bit
        self._any_accepted = True
        self._accepted += 1
        return True

    def _advance(self, counter: int) -> None:
        """Slide the window so ``counter`` is the highest: clear the blocks passed over."""
        current = self._highest // BLOCK_BITS
        target = counter // BLOCK_BITS
        if target != current:  # else still in the highest's block: nothing to clear
            # A jump of a whole ring or more clears everything; never loop further.
            ring, blocks = self._ring, self._blocks
            for step in range(1, min(target - current, blocks) + 1):
                ring[(current + step) % blocks] = 0
        self._highest = counter

    def statistics(self) -> ReplayStatistics:
        """A frozen snapshot of the counters (for the datapath's ``statistics()``)."""
        return ReplayStatistics(
            accepted=self._accepted,
            rejected_replay=self._rejected_replay,
            rejected_too_old=self._rejected_too_old,
            rejected_out_of_range=self._rejected_out_of_range,
            highest_accepted=self._highest if self._any_accepted else None,
            window_packets=self._window,
        )

    def __repr__(self) -> str:
        highest = self._highest if self._any_accepted else None
        return f"<ReplayWindow size={self._size} window={self._window} highest={highest}>"


def _check_last_accepted(_inst: object, _attr: object, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < -1:
        raise ValueError(f"last_accepted must be an int >= -1, got {value!r}")


@attrs.frozen
class NonceState:
    """The last accepted reattach nonce (Property 7); -1 means none yet.

    Frozen so that validation can ask without changing anything, and the
    session commits the successor in the same step as the transition.
    """

    last_accepted: int = attrs.field(default=-1, validator=_check_last_accepted)

    def is_fresh(self, nonce: int) -> bool:
        """Strictly above the last accepted nonce: a replay or reorder is never fresh."""
        return nonce > self.last_accepted

    def accepted(self, nonce: int) -> NonceState:
        """The state after accepting ``nonce``.  ValueError if it is not fresh: check first."""
        if not self.is_fresh(nonce):
            raise ValueError(f"nonce {nonce} is not above the last accepted {self.last_accepted}")
        return NonceState(nonce)
