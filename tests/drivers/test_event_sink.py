"""The event sink: ordered byte-exact lines, bounded queues, counted failures (spec 12).

Determinism rules: tests that only need the sink's logic replace
``EventSink._append`` (the one place that touches the file) with a fake and
run under ``autojump_clock``, asserting exact virtual times.  Tests that write
a real file run on the real clock (``autojump_clock`` cannot see worker
threads) under ``fail_after``, and synchronise on a spy around the real
``_append`` instead of sleeping.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
import trio.testing

from jvpn_trio.core.actions import EmitEvent, EventKind, Role
from jvpn_trio.core.states import ReasonCode
from jvpn_trio.drivers import event_sink
from jvpn_trio.drivers.event_sink import (
    DRAIN_TIMEOUT_S,
    EventSink,
    EventSinkStatistics,
    open_event_sink,
)

IO_TIMEOUT_S = 10.0


def make_event(i: int, **details: object) -> EmitEvent:
    return EmitEvent(
        kind=EventKind.PATH_HEALTH,
        t=i * 0.25,
        role=Role.CLIENT,
        session="000102030405060708090a0b0c0d0e0f",
        version=i,
        reason=ReasonCode.WITHIN_THRESHOLDS,
        policy="0123456789abcdef",
        details={"path": "p1", "seq": i, "note": "\u00e9\n\"q\"", **details},
    )


def expected_bytes(events: list[EmitEvent]) -> bytes:
    return b"".join(e.to_json_line().encode() + b"\n" for e in events)


def assert_accounted(stats: EventSinkStatistics) -> None:
    assert stats.emitted + stats.summaries == (
        stats.written
        + stats.queued
        + stats.dropped_full
        + stats.dropped_failed
        + stats.dropped_unencodable
        + stats.dropped_closed
        + stats.suppressed
    )


class FakeFile:
    """Stands in for ``EventSink._append``: records batches; can be held, or fail once."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self.release = trio.Event()
        self.held = False
        self.fail_next: tuple[int, OSError] | None = None

    async def append(self, data: bytes) -> tuple[int, OSError | None]:
        if self.held:
            await self.release.wait()
        else:
            await trio.sleep(0)
        if self.fail_next is not None:
            done, exc = self.fail_next
            self.fail_next = None
            self.batches.append(data[:done])
            return done, exc
        self.batches.append(data)
        return len(data), None


@pytest.fixture
def fake_file(monkeypatch: pytest.MonkeyPatch) -> FakeFile:
    fake = FakeFile()

    async def append(_sink: EventSink, _path: Path, data: bytes) -> tuple[int, OSError | None]:
        return await fake.append(data)

    monkeypatch.setattr(EventSink, "_append", append)
    return fake


class AppendSpy:
    """Wraps the real ``_append`` so a test can wait for "a batch went through" without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.results: list[tuple[int, OSError | None]] = []
        self._changed = trio.Event()
        real = EventSink._append

        async def spy(sink: EventSink, path: Path, data: bytes) -> tuple[int, OSError | None]:
            result = await real(sink, path, data)
            self.results.append(result)
            self._changed.set()
            self._changed = trio.Event()
            return result

        monkeypatch.setattr(EventSink, "_append", spy)

    async def wait_batches(self, n: int) -> None:
        while len(self.results) < n:
            await self._changed.wait()


# -- real files -------------------------------------------------------------------


async def test_lines_are_written_in_order_and_byte_identical(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = [make_event(i) for i in range(200)]
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_event_sink(path, capacity=256) as sink:
            for event in events[:100]:
                sink.emit(event)
            await trio.sleep(0)
            for event in events[100:]:
                sink.emit(event)
    assert path.read_bytes() == expected_bytes(events)
    stats = sink.statistics()
    assert (stats.emitted, stats.written, stats.queued, stats.dropped_full) == (200, 200, 0, 0)
    assert stats.write_failures == 0 and stats.last_error is None and not stats.failing
    assert_accounted(stats)


async def test_appends_to_an_existing_file_and_creates_new_ones_owner_only(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_bytes(b"previous line\n")
    new = tmp_path / "new.jsonl"
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_event_sink(old, capacity=4) as a, open_event_sink(new, capacity=4) as b:
            a.emit(make_event(1))
            b.emit(make_event(2))
    assert old.read_bytes() == b"previous line\n" + expected_bytes([make_event(1)])
    assert new.read_bytes() == expected_bytes([make_event(2)])
    assert new.stat().st_mode & 0o777 == event_sink.LOG_FILE_MODE


async def test_path_under_a_regular_file_counts_failures_and_emit_keeps_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ENOTDIR fails for root too (a chmod 000 directory would not stop root).
    (tmp_path / "file").write_text("not a directory")
    path = tmp_path / "file" / "x.jsonl"
    spy = AppendSpy(monkeypatch)
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_event_sink(path, capacity=8) as sink:
            sink.emit(make_event(1))
            await spy.wait_batches(1)
            sink.emit(make_event(2))
            sink.emit(make_event(3))
    stats = sink.statistics()
    assert stats.emitted == 3
    assert stats.written == 0
    assert stats.dropped_failed == 3
    assert stats.write_failures == len(spy.results) >= 2
    assert stats.failing
    assert stats.last_error is not None and stats.last_error.startswith("NotADirectoryError: ")
    assert "\n" not in stats.last_error
    assert_accounted(stats)


async def test_missing_directory_fails_then_recovers_when_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    spy = AppendSpy(monkeypatch)
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_event_sink(path, capacity=8) as sink:
            sink.emit(make_event(1))
            await spy.wait_batches(1)
            failed = sink.statistics()
            assert (failed.write_failures, failed.dropped_failed, failed.failing) == (1, 1, True)
            assert failed.last_error is not None and failed.last_error.startswith("FileNotFoundError: ")
            (tmp_path / "logs").mkdir()
            sink.emit(make_event(2))
            await spy.wait_batches(2)
    assert path.read_bytes() == expected_bytes([make_event(2)])
    stats = sink.statistics()
    assert (stats.written, stats.write_failures, stats.failing) == (1, 1, False)
    assert stats.last_error == failed.last_error  # the last error stays visible
    assert_accounted(stats)


async def test_slow_subscriber_drops_only_its_own_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events = [make_event(i) for i in range(10)]
    with trio.fail_after(IO_TIMEOUT_S):
        async with open_event_sink(path, capacity=16) as sink:
            fast = sink.subscribe(16, name="fast")
            slow = sink.subscribe(2, name="slow")
            for event in events:
                sink.emit(event)
            got_fast = [fast.receive_nowait() for _ in range(10)]
            got_slow = [slow.receive_nowait(), slow.receive_nowait()]
            with pytest.raises(trio.WouldBlock):
                slow.receive_nowait()
    assert got_fast == events
    assert got_slow == events[:2]
    assert path.read_bytes() == expected_bytes(events)
    stats = sink.statistics()
    assert stats.dropped_full == 0 and stats.written == 10
    by_name = {s.name: s for s in stats.subscribers}
    assert (by_name["fast"].delivered, by_name["fast"].dropped_full) == (10, 0)
    assert (by_name["slow"].delivered, by_name["slow"].dropped_full) == (2, 8)
    assert by_name["slow"].capacity == 2 and by_name["slow"].closed


# -- sink logic with a fake file, virtual time --------------------------------------


async def test_full_channel_drops_and_counts_without_blocking(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    fake_file.held = True
    path = Path("/nonexistent/never-opened.jsonl")
    events = [make_event(i) for i in range(11)]
    async with open_event_sink(path, capacity=4) as sink:
        sink.emit(events[0])
        await trio.testing.wait_all_tasks_blocked()  # the writer now holds events[0]
        start = trio.current_time()
        for event in events[1:]:
            sink.emit(event)  # synchronous: there is nothing to wait for
        assert trio.current_time() == start
        stats = sink.statistics()
        assert (stats.emitted, stats.queued, stats.dropped_full, stats.written) == (11, 5, 6, 0)
        assert_accounted(stats)
        fake_file.release.set()
    assert fake_file.batches == [expected_bytes(events[:1]), expected_bytes(events[1:5])]
    stats = sink.statistics()
    assert (stats.written, stats.queued, stats.dropped_full, stats.dropped_closed) == (5, 0, 6, 0)
    assert_accounted(stats)


async def test_exit_drain_is_bounded_and_counts_what_it_leaves(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    fake_file.held = True  # a disk that never answers
    async with open_event_sink(Path("/stuck.jsonl"), capacity=8) as sink:
        for i in range(5):
            sink.emit(make_event(i))
        await trio.testing.wait_all_tasks_blocked()
        exit_started = trio.current_time()
    assert trio.current_time() == exit_started + DRAIN_TIMEOUT_S
    stats = sink.statistics()
    assert (stats.written, stats.queued, stats.dropped_closed) == (0, 0, 5)
    sink.emit(make_event(9))  # after close: still no exception, just counted
    stats = sink.statistics()
    assert (stats.emitted, stats.dropped_closed) == (6, 6)
    assert_accounted(stats)


async def test_cancelled_owner_still_drains_what_was_queued(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    events = [make_event(i) for i in range(6)]
    with trio.CancelScope() as owner:
        async with open_event_sink(Path("/events.jsonl"), capacity=8) as sink:
            for event in events:
                sink.emit(event)
            owner.cancel()
            await trio.sleep(0)
    assert b"".join(fake_file.batches) == expected_bytes(events)
    assert sink.statistics().written == 6


async def test_a_cut_line_is_isolated_by_a_newline(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    first, second = make_event(1), make_event(2)
    cut = len(first.to_json_line()) // 2
    fake_file.fail_next = (cut, OSError(errno.ENOSPC, "No space left on device"))
    async with open_event_sink(Path("/events.jsonl"), capacity=8) as sink:
        sink.emit(first)
        await trio.testing.wait_all_tasks_blocked()
        sink.emit(second)
    assert fake_file.batches == [expected_bytes([first])[:cut], b"\n" + expected_bytes([second])]
    stats = sink.statistics()
    assert (stats.written, stats.dropped_failed, stats.write_failures) == (1, 1, 1)
    assert stats.last_error == "OSError: [Errno 28] No space left on device"
    assert_accounted(stats)


async def test_unencodable_event_is_dropped_alone(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    good = make_event(1)
    bad = make_event(2, blob=object())
    async with open_event_sink(Path("/events.jsonl"), capacity=8) as sink:
        sink.emit(bad)
        sink.emit(good)
    assert b"".join(fake_file.batches) == expected_bytes([good])
    stats = sink.statistics()
    assert (stats.written, stats.dropped_unencodable) == (1, 1)
    assert_accounted(stats)


async def test_no_path_feeds_subscribers_and_also_only(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[EmitEvent] = []
    events = [make_event(i) for i in range(3)]
    async with open_event_sink(None, capacity=1, also=seen.append) as sink:
        feed = sink.subscribe(8)
        for event in events:
            sink.emit(event)
    assert seen == events
    assert [e async for e in feed] == events  # the feed ends when the sink closes
    stats = sink.statistics()
    assert (stats.emitted, stats.written, stats.dropped_full, stats.queued) == (3, 0, 0, 0)
    assert stats.subscribers[0].name == "subscriber-1"


async def test_closed_subscriber_is_dropped_from_the_fan_out(autojump_clock: trio.testing.MockClock) -> None:
    async with open_event_sink(None, capacity=1) as sink:
        feed = sink.subscribe(1, name="ui")
        await feed.aclose()
        sink.emit(make_event(1))
        sink.emit(make_event(2))
    (ui,) = sink.statistics().subscribers
    assert (ui.delivered, ui.dropped_full, ui.closed) == (0, 0, True)


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5])
async def test_capacity_must_be_positive(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        async with open_event_sink(None, capacity=capacity):  # type: ignore[arg-type]
            pass


async def test_an_error_in_the_block_comes_out_unwrapped_after_the_drain(
    fake_file: FakeFile, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with open_event_sink(Path("/events.jsonl"), capacity=8) as sink:
            sink.emit(make_event(1))
            raise KeyError("boom")
    assert b"".join(fake_file.batches) == expected_bytes([make_event(1)])


# -- history and attach (the control socket's events command) ------------------------------


def test_attach_replays_the_history_then_feeds_live_events_without_gap_or_duplicate() -> None:
    sink = EventSink(None, capacity=1, history=5)
    for i in range(1, 8):
        sink.emit(make_event(i))
    last3 = sink.attach(16, replay=3)
    everything = sink.attach(16)
    none = sink.attach(16, replay=0)
    sink.emit(make_event(8))
    assert [item.seq for item in last3.replayed] == [5, 6, 7]
    assert [item.event for item in last3.replayed] == [make_event(i) for i in (5, 6, 7)]
    assert [item.seq for item in everything.replayed] == [3, 4, 5, 6, 7]  # the ring keeps 5
    assert none.replayed == () and last3.next_seq == 8
    for att in (last3, everything, none):
        live = att.live.receive_nowait()
        assert (live.seq, live.event) == (8, make_event(8))
    assert sink.statistics().history == 5 and sink.next_seq == 9


def test_attach_since_counts_what_left_the_history_and_refuses_numbers_from_another_run() -> None:
    sink = EventSink(None, capacity=1, history=4)
    for i in range(1, 11):  # the ring keeps 7..10
        sink.emit(make_event(i))
    assert [x.seq for x in sink.attach(4, since=8).replayed] == [9, 10]
    old = sink.attach(4, since=2)
    assert ([x.seq for x in old.replayed], old.missed) == ([7, 8, 9, 10], 4)
    assert sink.attach(4, since=10).replayed == ()
    with pytest.raises(ValueError, match="ahead of this sink"):
        sink.attach(4, since=11)
    with pytest.raises(ValueError, match="replay must be a non-negative int"):
        sink.attach(4, replay=-1)
    with pytest.raises(ValueError, match="history must be a non-negative int"):
        EventSink(None, capacity=1, history=-1)
    assert EventSink(None, capacity=1).run_id != sink.run_id


def test_a_full_attached_feed_drops_for_itself_and_closed_ones_are_forgotten() -> None:
    sink = EventSink(None, capacity=1, history=0)
    slow = sink.attach(2, name="slow")
    gone = sink.attach(2, name="gone")
    gone.live.close()
    for i in range(1, 6):
        sink.emit(make_event(i))  # never blocks, never raises
    assert [slow.live.receive_nowait().seq for _ in range(2)] == [1, 2]
    stats = {s.name: s for s in sink.statistics().subscribers}
    assert (stats["slow"].delivered, stats["slow"].dropped_full) == (2, 3)
    assert stats["gone"].closed
    sink.attach(2, name="later")
    assert [s.name for s in sink.statistics().subscribers] == ["slow", "later"]
