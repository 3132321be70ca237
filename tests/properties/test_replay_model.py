"""ReplayWindow against a slow reference model (wireguard-go compares allowedips the same way).

The model is the documented semantics of ``jvpn_trio.core.antireplay``, written
the obvious way with a Python set::

    accept(c) iff 0 <= c < COUNTER_LIMIT and c not in seen
                  and (seen is empty or c > max(seen) - W),   W = size - 64

The ring must agree with it exactly, for every counter sequence.
"""

from __future__ import annotations

import attrs
from hypothesis import given, strategies as st

from jvpn_trio.core.antireplay import BLOCK_BITS, COUNTER_LIMIT, ReplayWindow

SIZES = st.sampled_from([2048, 2048 + 64, 4096, 8192])


class ReferenceWindow:
    """The specification, slowly: a set of seen counters and the highest one."""

    def __init__(self, size: int) -> None:
        self.window = size - BLOCK_BITS
        self.seen: set[int] = set()
        self.highest: int | None = None

    def check(self, counter: int) -> bool:
        if not 0 <= counter < COUNTER_LIMIT:
            return False
        if counter in self.seen:
            return False
        return self.highest is None or counter > self.highest - self.window

    def commit(self, counter: int) -> bool:
        if not self.check(counter):
            return False
        self.seen.add(counter)
        self.highest = counter if self.highest is None else max(self.highest, counter)
        return True


@st.composite
def counter_sequences(draw: st.DrawFn, size: int) -> list[int]:
    """A stream as a receiver sees it: runs, reordering, duplicates, jumps and edge values.

    Jumps are often multiples of a block or of the ring, and aliases revisit
    the ring slot and bit of an earlier counter, so a stale bit would show;
    going back lands on both sides of the window edge.
    """
    window = size - BLOCK_BITS
    cursor = draw(st.sampled_from([0, 1, 63, 64, window, size, 1 << 32, COUNTER_LIMIT - 4 * size, COUNTER_LIMIT - 70]))
    out: list[int] = []
    ops = st.sampled_from(["run", "run", "stream", "back", "jump", "dup", "alias", "alias", "edge"])
    for _ in range(draw(st.integers(1, 25))):
        op = draw(ops)
        if op == "run":
            length = draw(st.integers(1, 2 * BLOCK_BITS + 2))
            out.extend(range(cursor, cursor + length))
            cursor += length
        elif op == "stream":
            # Longer than the ring, with every ``stride``-th pair swapped: the
            # late one of a pair often opens a block that the slide just reused.
            length = draw(st.integers(size - BLOCK_BITS, size + 3 * BLOCK_BITS))
            stride = draw(st.integers(2, 97))
            stream = list(range(cursor, cursor + length))
            for i in range(0, length - 1, stride):
                stream[i], stream[i + 1] = stream[i + 1], stream[i]
            out.extend(stream)
            cursor += length
        elif op == "back":
            distance = draw(
                st.one_of(
                    st.integers(0, 2 * BLOCK_BITS),
                    st.integers(window - 2, window + 2),
                    st.integers(0, size + BLOCK_BITS),
                )
            )
            out.append(cursor - distance)
        elif op == "jump":
            blocks = draw(st.integers(1, 2 * size // BLOCK_BITS + 1))
            nudge = draw(st.sampled_from([0, 0, -3, -1, 1, 3]))
            cursor += draw(st.sampled_from([blocks * BLOCK_BITS + nudge, draw(st.integers(1, 1 << 48))]))
        elif op == "dup" and out:
            out.append(draw(st.sampled_from(out)))
        elif op == "alias" and out:
            # Same ring slot and bit as a counter seen earlier: a stale bit
            # left behind by the slide would show up as a false replay.
            alias = draw(st.sampled_from(out)) + draw(st.sampled_from([size, 2 * size, size - BLOCK_BITS]))
            out.append(alias)
            cursor = max(cursor, alias + 1)
        else:
            # Never a valid high counter here: it would leave everything after it too old.
            out.append(draw(st.sampled_from([-1, 0, COUNTER_LIMIT, 1 << 64])))
    return out


@st.composite
def size_and_counters(draw: st.DrawFn) -> tuple[int, list[int]]:
    size = draw(SIZES)
    return size, draw(counter_sequences(size))


@given(size_and_counters())
def test_ring_matches_reference(case: tuple[int, list[int]]) -> None:
    size, counters = case
    ring = ReplayWindow(size)
    model = ReferenceWindow(size)
    for counter in counters:
        expected = model.check(counter)
        assert ring.check(counter) is expected, counter
        assert ring.commit(counter) is model.commit(counter), counter
    stats = ring.statistics()
    assert stats.accepted == len(model.seen)
    assert stats.highest_accepted == model.highest
    assert stats.accepted + stats.rejected_replay + stats.rejected_too_old + stats.rejected_out_of_range == len(
        counters
    )


@given(size_and_counters(), st.lists(st.integers(-(1 << 65), 1 << 65), max_size=40))
def test_check_never_mutates(case: tuple[int, list[int]], probes: list[int]) -> None:
    """Interleaving any check() calls changes no commit() result and no statistic."""
    size, counters = case
    plain = ReplayWindow(size)
    checked = ReplayWindow(size)
    extra = probes + counters  # also re-check counters that will be committed
    for i, counter in enumerate(counters):
        start = i % (len(extra) or 1)
        for probe in extra[start : start + 3]:  # three probes, sliced without copying the rest
            checked.check(probe)
        assert checked.commit(counter) is plain.commit(counter)
    for probe in extra:
        assert checked.check(probe) is plain.check(probe)
    assert attrs.asdict(checked.statistics()) == attrs.asdict(plain.statistics())


@given(SIZES, st.integers(0, COUNTER_LIMIT - 1), st.integers(0, 4096))
def test_effective_window_is_exact(size: int, top: int, back: int) -> None:
    """Exactly W counters up to the highest are acceptable, wherever ``top`` sits in its block."""
    ring = ReplayWindow(size)
    assert ring.commit(top)
    candidate = top - back
    if candidate < 0:
        return
    expected = 0 < back < size - BLOCK_BITS  # back == 0 is the replay of ``top`` itself
    assert ring.check(candidate) is expected
    assert ring.commit(candidate) is expected
