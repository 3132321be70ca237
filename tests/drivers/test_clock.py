"""The boottime run clock and the suspend detector (drivers/clock.py).

Determinism rules: no test waits on real time to decide anything.  A
:class:`FakeKernel` stands in for CLOCK_BOOTTIME and CLOCK_MONOTONIC; a
suspend adds to the boottime reading only.  The detector runs on Trio's
autojump mock clock with the fake kernel following it.  The tests that run a
real Trio loop on :class:`BoottimeClock` advance the fake kernel from an
instrument by exactly the timeout of each I/O wait (kept at 1 ms, so the real
waits are negligible), which makes the loop's view of time independent of how
long the waits really took.  Only the first test reads the real kernel clocks,
to check the readers are wired to them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from jvpn_trio.drivers.clock import (
    MAX_IO_WAIT_S,
    OFFSETS_SIZE,
    SUSPEND_THRESHOLD_S,
    BoottimeClock,
    ClockOffsetsError,
    KernelClocks,
    Resumed,
    SuspendDetector,
    SuspendDetectorStatistics,
    offset_clocks,
    read_boottime,
    read_monotonic,
    write_clock_offsets,
)



@attrs.define
class FakeKernel:
    """CLOCK_BOOTTIME and CLOCK_MONOTONIC: both run with ``running``; a suspend moves boottime only."""

    running: float = 1_000.0
    suspended: float = 0.0

    def boottime(self) -> float:
        return self.running + self.suspended

    def monotonic(self) -> float:
        return self.running

    def suspend(self, seconds: float) -> None:
        self.suspended += seconds


# -- the readers and the clock --------------------------------------------------------------------


def test_readers_are_the_kernel_clocks() -> None:
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    reading = BoottimeClock().current_time()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= reading <= after
    # BOOTTIME is MONOTONIC plus every suspend since boot, so never behind it (read second).
    monotonic = read_monotonic()
    assert read_boottime() >= monotonic


def test_current_time_is_the_reading() -> None:
    kernel = FakeKernel()
    clock = BoottimeClock(read=kernel.boottime)
    assert clock.current_time() == 1_000.0
    kernel.suspend(1_800.0)
    assert clock.current_time() == 2_800.0


@pytest.mark.parametrize(
    ("deadline", "wait"),
    [(1_000.25, 0.25), (1_000.0 + MAX_IO_WAIT_S, MAX_IO_WAIT_S), (1_060.0, MAX_IO_WAIT_S), (math.inf, MAX_IO_WAIT_S),
     (999.0, -1.0)],
    ids=["near", "at-the-cap", "far", "none", "past"],
)
def test_io_waits_are_capped(deadline: float, wait: float) -> None:
    # epoll's timeout runs on CLOCK_MONOTONIC: an uncapped 60 s wait would oversleep by a whole suspend.
    clock = BoottimeClock(read=FakeKernel().boottime)
    assert clock.deadline_to_sleep_time(deadline) == wait


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_wait_s must be positive"):
        BoottimeClock(max_wait_s=0.0)
    with pytest.raises(ValueError, match="must be positive"):
        SuspendDetector(interval_s=0.0)
    with pytest.raises(ValueError, match="must be positive"):
        SuspendDetector(threshold_s=-1.0)


@attrs.define(eq=False)  # instruments are kept in a set, by identity
class AdvanceOnWait(trio.abc.Instrument):
    """A Trio instrument: each I/O wait counts as running time; the first real wait also holds a suspend."""

    kernel: FakeKernel
    suspend_s: float
    waits: list[float] = attrs.Factory(list)

    def after_io_wait(self, timeout: float) -> None:
        self.waits.append(timeout)
        self.kernel.running += timeout
        if timeout > 0 and self.suspend_s:
            self.kernel.suspend(self.suspend_s)
            self.suspend_s = 0.0


def test_a_deadline_that_passed_during_a_suspend_fires_on_the_first_wake_up() -> None:
    kernel = FakeKernel()
    instrument = AdvanceOnWait(kernel, suspend_s=1_800.0)
    clock = BoottimeClock(read=kernel.boottime, max_wait_s=0.001)
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic)
    reports: list[Resumed] = []
    reported = trio.Event()
    woke: list[float] = []

    def report(resumed: Resumed) -> None:
        reports.append(resumed)
        reported.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(detector.serve, report)
            start = trio.current_time()
            await trio.sleep(60.0)  # a probe timer, a loss TTL: due long before the resume
            woke.append(trio.current_time() - start)
            with trio.fail_after(5.0):  # a guard only (5000 waits of 1 ms); set after the suspend, which it would count
                await reported.wait()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock, instruments=[instrument])
    # No wait longer than the cap; the machine slept 30 min in the first one, and everything due
    # fired right after it: 1 ms of running time, not 60 s more (what an uncapped wait would cost).
    assert max(instrument.waits) == 0.001
    assert woke == [pytest.approx(1_800.001)]
    assert [(r.suspended_for_s, r.at) for r in reports] == [(pytest.approx(1_800.0), pytest.approx(2_800.001))]


# -- the detector -----------------------------------------------------------------------------------


class MockKernel(FakeKernel):
    """:class:`FakeKernel` driven by Trio's mock clock: running time is ``trio.current_time()``."""

    def monotonic(self) -> float:
        return trio.current_time()

    def boottime(self) -> float:
        return trio.current_time() + self.suspended


async def run_detector(script: list[tuple[float, float]], *, until: float, **options: float) -> tuple[
    list[Resumed], SuspendDetectorStatistics
]:
    """Start a detector at t=0, suspend ``seconds`` at each scripted time, stop at ``until``."""
    kernel = MockKernel()
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic, **options)
    reports: list[Resumed] = []
    with trio.move_on_at(until):
        async with trio.open_nursery() as nursery:
            await nursery.start(detector.serve, reports.append)
            for at, seconds in script:
                await trio.sleep_until(at)
                kernel.suspend(seconds)
    return reports, detector.statistics()


async def test_a_suspend_is_reported_at_the_next_sample(autojump_clock: trio.abc.Clock) -> None:
    reports, stats = await run_detector([(2.5, 45.0)], until=5.5)
    assert reports == [Resumed(suspended_for_s=45.0, at=3.0)]
    assert stats == SuspendDetectorStatistics(samples=5, resumes=1, total_suspended_s=45.0, last=reports[0])


async def test_each_suspend_is_reported_once_with_its_own_length(autojump_clock: trio.abc.Clock) -> None:
    reports, stats = await run_detector([(1.5, 6.0), (4.5, 1_800.0)], until=10.5)
    assert reports == [Resumed(suspended_for_s=6.0, at=2.0), Resumed(suspended_for_s=1_800.0, at=5.0)]
    assert (stats.samples, stats.resumes, stats.total_suspended_s) == (10, 2, 1_806.0)


async def test_a_jump_up_to_the_threshold_is_not_a_suspend(autojump_clock: trio.abc.Clock) -> None:
    # "More than the threshold": a jump of exactly SUSPEND_THRESHOLD_S is absorbed into the baseline.
    reports, stats = await run_detector([(0.5, SUSPEND_THRESHOLD_S), (1.5, 0.3), (2.5, 0.3)], until=3.5)
    assert reports == []
    assert (stats.samples, stats.resumes) == (3, 0)


async def test_the_threshold_and_interval_are_parameters(autojump_clock: trio.abc.Clock) -> None:
    reports, _ = await run_detector([(0.3, 0.5)], until=1.0, interval_s=0.25, threshold_s=0.2)
    assert reports == [Resumed(suspended_for_s=0.5, at=0.5)]


async def test_a_suspend_before_the_detector_starts_is_not_reported(autojump_clock: trio.abc.Clock) -> None:
    kernel = MockKernel()
    kernel.suspend(3_600.0)  # slept before `up` started: that is the baseline, not news
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic)
    reports: list[Resumed] = []
    with trio.move_on_after(3.5):
        await detector.serve(reports.append)
    assert reports == []
    assert detector.statistics().samples == 3


async def test_check_now_measures_at_once_instead_of_at_the_next_sample(autojump_clock: trio.abc.Clock) -> None:
    kernel = MockKernel()
    detector = SuspendDetector(read_boottime=kernel.boottime, read_monotonic=kernel.monotonic)
    reports: list[Resumed] = []
    with trio.move_on_at(0.9):
        async with trio.open_nursery() as nursery:
            await nursery.start(detector.serve, reports.append)
            await trio.sleep_until(0.25)
            kernel.suspend(6.0)
            detector.check_now()  # logind's resume hint
    assert reports == [Resumed(suspended_for_s=6.0, at=0.25)]
    assert detector.statistics().samples == 1  # the one the hint asked for; the 1 s sample did not come


# -- clock offsets: how the lab lives through a suspend (--clock-offsets) ------------------------


def test_offsets_written_by_another_hand_show_at_the_next_reading(tmp_path: Path) -> None:
    path = tmp_path / "client.clock"
    write_clock_offsets(path, boottime=0.0, monotonic=0.0)
    clocks = offset_clocks(path)
    assert abs(clocks.boottime() - read_boottime()) < 0.5 and abs(clocks.monotonic() - read_monotonic()) < 0.5
    write_clock_offsets(path, boottime=1_800.0, monotonic=-3.0)  # a 30 min sleep that took 3 s of wall time
    gap_before = read_boottime() - read_monotonic()
    assert clocks.boottime() - clocks.monotonic() - gap_before == pytest.approx(1_803.0, abs=0.5)
    assert clocks.run_clock().current_time() - read_boottime() == pytest.approx(1_800.0, abs=0.5)


@pytest.mark.parametrize("content", [b"", b"\0" * (OFFSETS_SIZE - 1), b"\0" * (OFFSETS_SIZE + 1)], ids=["empty", "short", "long"])
def test_a_clock_offsets_file_of_the_wrong_size_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.clock"
    path.write_bytes(content)
    with pytest.raises(ClockOffsetsError, match=f"expected exactly {OFFSETS_SIZE} bytes"):
        offset_clocks(path)
    with pytest.raises(ClockOffsetsError, match="No such file"):
        offset_clocks(tmp_path / "missing.clock")


def test_the_kernel_clocks_are_the_default_pair() -> None:
    clocks = KernelClocks()
    assert clocks.boottime is read_boottime and clocks.monotonic is read_monotonic
    assert clocks.run_clock().read is read_boottime
