"""Table tests for the DATA-counter replay window and reattach nonces (spec 9, Property 7).

Determinism: no clock, no randomness; every case is an explicit counter sequence.
The window under test has the smallest ring (2048 counters), so its effective
window is W = 2048 - 64 = 1984.
"""

from __future__ import annotations

import attrs
import pytest

from jvpn_trio.core.policy import Policy
from jvpn_trio.core.antireplay import (
    BLOCK_BITS,
    COUNTER_LIMIT,
    MIN_WINDOW_PACKETS,
    NonceState,
    ReplayStatistics,
    ReplayWindow,
)

SIZE = MIN_WINDOW_PACKETS
W = SIZE - BLOCK_BITS


def run(window: ReplayWindow, counters: list[int]) -> list[bool]:
    return [window.commit(c) for c in counters]


# (name, counters, expected commit results)
CASES = [
    ("in order", [0, 1, 2, 3], [True] * 4),
    ("counter zero first and twice", [0, 0], [True, False]),
    ("zero after others", [5, 0, 0], [True, True, False]),
    ("duplicate", [1, 2, 2, 1], [True, True, False, False]),
    ("out of order within window", [10, 3, 7, 9, 3, 10], [True, True, True, True, False, False]),
    ("first counter far ahead, older ones still fine", [5000, 5000 - W + 1, 4000], [True, True, True]),
    ("exactly W behind is too old", [5000, 5000 - W], [True, False]),
    ("W - 1 behind is the oldest accepted", [5000, 5000 - (W - 1)], [True, True]),
    ("very old", [10_000, 3], [True, False]),
    (
        "slide across block boundaries keeps the in-window bits",
        [63, 64, 127, 128, 63, 64, 127, 128],
        [True] * 4 + [False] * 4,
    ),
    (
        # 3000 (block 46) clears ring slots 18..31 and 0..14 on the way; the
        # slots of blocks 15..17 keep their bits: 1100 stays seen, 1017 is fresh
        "slide reuses ring slots",
        [70, 1100, 3000, 1100, 1017, 70],
        [True, True, True, False, True, False],
    ),
    (
        "huge jump clears the whole ring",
        [1, 2, 3, 1 << 40, (1 << 40) - 1, (1 << 40) - W + 1, 3],
        [True, True, True, True, True, True, False],
    ),
    (
        "jump of exactly one ring",
        [100, 100 + SIZE, 100 + SIZE - 1, 100],
        [True, True, True, False],
    ),
    ("max counter", [COUNTER_LIMIT - 1, COUNTER_LIMIT - 1, COUNTER_LIMIT - 2], [True, False, True]),
    ("limit itself is rejected", [COUNTER_LIMIT, 1 << 64, COUNTER_LIMIT - 1], [False, False, True]),
    ("negative is rejected", [-1, 0], [False, True]),
]


@pytest.mark.parametrize("counters, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table(counters: list[int], expected: list[bool]) -> None:
    window = ReplayWindow(SIZE)
    checked = []
    committed = []
    for c in counters:
        checked.append(window.check(c))
        committed.append(window.commit(c))
    assert committed == expected
    assert checked == expected  # check() predicts commit() exactly


def test_reused_slot_after_slide_is_clear() -> None:
    # Block 0 and block 32 share a slot in a 32-block ring.  After sliding to
    # block 32, counter 2048 + 5 must be fresh even though 5 was seen before.
    window = ReplayWindow(SIZE)
    assert window.commit(5)
    assert window.commit(SIZE + 5)
    assert not window.check(5)  # too old now
    assert window.commit(SIZE + 4)  # same block as 2053, untouched bit
    assert not window.commit(SIZE + 5)


def test_statistics_count_only_commits() -> None:
    window = ReplayWindow(SIZE)
    assert window.statistics() == ReplayStatistics(
        accepted=0,
        rejected_replay=0,
        rejected_too_old=0,
        rejected_out_of_range=0,
        highest_accepted=None,
        window_packets=W,
    )
    run(window, [3000, 3000, 1, -5, COUNTER_LIMIT, 2999])
    for c in (3000, 1, -5):
        window.check(c)
    stats = window.statistics()
    assert attrs.asdict(stats) == {
        "accepted": 2,
        "rejected_replay": 1,
        "rejected_too_old": 1,
        "rejected_out_of_range": 2,
        "highest_accepted": 3000,
        "window_packets": W,
    }
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.accepted = 9  # type: ignore[misc]


def test_highest_zero_is_reported() -> None:
    window = ReplayWindow(SIZE)
    window.commit(0)
    assert window.statistics().highest_accepted == 0


def test_check_does_not_move_window() -> None:
    window = ReplayWindow(SIZE)
    window.commit(10)
    assert window.check(1 << 40)
    assert window.commit(9)  # would be too old had check() slid the window
    assert window.statistics().highest_accepted == 10


@pytest.mark.parametrize("size", [SIZE, SIZE + 64, 8192, Policy().replay_window_packets])
def test_sizes(size: int) -> None:
    window = ReplayWindow(size)
    assert window.size_packets == size
    assert window.window == size - BLOCK_BITS
    top = 10 * size + 17
    assert window.commit(top)
    assert window.commit(top - window.window + 1)
    assert not window.commit(top - window.window)
    assert str(size) in repr(window)


@pytest.mark.parametrize("size", [0, 64, SIZE - 64, SIZE + 1, SIZE + 32, -SIZE, True, 2048.0, "2048"])
def test_bad_sizes(size: object) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(size)  # type: ignore[arg-type]


def test_repr_names_highest() -> None:
    window = ReplayWindow(SIZE)
    assert "highest=None" in repr(window)
    window.commit(42)
    assert "highest=42" in repr(window)


# -- reattach nonces (Property 7) ------------------------------------------------


def test_nonce_starts_empty() -> None:
    state = NonceState()
    assert state.last_accepted == -1
    assert state.is_fresh(0)
    assert not state.is_fresh(-1)


@pytest.mark.parametrize(
    "last, nonce, fresh",
    [(5, 6, True), (5, 5, False), (5, 4, False), (5, 1 << 70, True), (0, 0, False), (-1, -2, False)],
)
def test_nonce_freshness(last: int, nonce: int, fresh: bool) -> None:
    assert NonceState(last).is_fresh(nonce) is fresh


def test_nonce_accept_returns_new_value() -> None:
    state = NonceState()
    after = state.accepted(7)
    assert after == NonceState(7)
    assert state == NonceState()  # frozen: the old value is untouched
    assert after.accepted(8).last_accepted == 8


@pytest.mark.parametrize("nonce", [7, 6, -1])
def test_nonce_replay_raises_and_changes_nothing(nonce: int) -> None:
    state = NonceState(7)
    with pytest.raises(ValueError, match="not above"):
        state.accepted(nonce)
    assert state.last_accepted == 7


@pytest.mark.parametrize("bad", [-2, True, 1.5, "3"])
def test_nonce_state_validates(bad: object) -> None:
    with pytest.raises(ValueError):
        NonceState(bad)  # type: ignore[arg-type]


def test_nonce_state_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        NonceState().last_accepted = 3  # type: ignore[misc]
