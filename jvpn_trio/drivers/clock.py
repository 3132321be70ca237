"""Time that keeps counting while the laptop sleeps, and a detector that notices the sleep.

Theory of operation
-------------------
Linux has two clocks that never jump backwards: CLOCK_MONOTONIC, which
stops while the machine is suspended, and CLOCK_BOOTTIME, which the kernel
advances by the suspended time on resume.  Trio's default clock is the
former, so after a 6 s suspend every deadline of the core and the drivers
is 6 s late, the client's session clock is 6 s behind the gateway's, and its
REATTACH timestamps fall outside the freshness window (docs/spec.md,
"Freshness across a suspend").

:class:`BoottimeClock` runs the Trio loop on CLOCK_BOOTTIME instead:
``trio.current_time()`` then counts the suspend, so the session clocks of
client and gateway advance together, and every deadline that came due while
the machine slept fires on resume (WireGuard's Linux module measures key
age on the same clock, ``ktime_get_coarse_boottime_ns``).  One catch: the
kernel measures the timeout of the I/O wait (epoll) on CLOCK_MONOTONIC, so
a loop asleep until a deadline would oversleep by the whole suspend.  The
clock therefore never lets Trio block for more than ``max_wait_s``; after
that the loop reads CLOCK_BOOTTIME again and expires what is due.

:class:`SuspendDetector` is a task that samples ``BOOTTIME - MONOTONIC``:
the difference is constant while the machine runs (NTP slews both clocks
alike) and grows by exactly the suspended time.  A growth above
``threshold_s`` between two samples is reported as :class:`Resumed`, so the
agent can probe every path at once and, when the suspend outlasted what the
gateway keeps of a silent session (``core/agent.py``, ``Succession.resumed``),
handshake anew instead of waiting for timeouts.  This module only detects;
logind's ``PrepareForSleep`` signal (``logind.py``) is an earlier hint where a
system bus runs.

Both clock readers are parameters, so tests move time by hand.
:class:`KernelClocks` holds the pair a process runs on; :func:`offset_clocks`
adds offsets read from a small file at every reading, which is how the lab
(``jvpn-trio up/serve --clock-offsets FILE``) makes a real process live
through a suspend without suspending the machine: it stops the client,
moves the client's CLOCK_BOOTTIME forward and its CLOCK_MONOTONIC back by
what the kernel would have, and moves both of the gateway's forward.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import attrs
import trio


#: The longest one I/O wait may block, in seconds: a deadline passed during a suspend fires at
#: most this long after resume.  The loop wakes this often when idle, which is negligible next
#: to probing every ``probe_interval_ms``.
MAX_IO_WAIT_S = 1.0
#: How often :class:`SuspendDetector` compares the two clocks, in seconds.
SUSPEND_SAMPLE_INTERVAL_S = 1.0
#: Growth of ``BOOTTIME - MONOTONIC`` between two samples above which a suspend is reported, in
#: seconds.  The difference does not move while the machine runs, so any clear jump is a suspend;
#: one second is what still matters next to a probe timeout and is far above reading noise.
SUSPEND_THRESHOLD_S = 1.0

Reader = Callable[[], float]

#: A clock-offsets file: two native doubles, seconds added to CLOCK_BOOTTIME and to CLOCK_MONOTONIC.
OFFSETS_FORMAT = "=dd"
OFFSETS_SIZE = struct.calcsize(OFFSETS_FORMAT)


def read_boottime() -> float:
    """CLOCK_BOOTTIME in seconds: monotonic, and counts time spent suspended (Linux)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_monotonic() -> float:
    """CLOCK_MONOTONIC in seconds: monotonic, and stops while the machine is suspended."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class BoottimeClock(trio.abc.Clock):
    """A Trio run clock on CLOCK_BOOTTIME: deadlines include the time the machine slept.

    Pass it as ``trio.run(..., clock=BoottimeClock())``.  ``read`` is the
    clock source (seconds); ``max_wait_s`` bounds each I/O wait so a suspend
    cannot stretch it (see the module notes).
    """

    read: Reader = read_boottime
    max_wait_s: float = attrs.field(default=MAX_IO_WAIT_S, validator=_positive)

    def start_clock(self) -> None:
        """Nothing to set up: the kernel's clock is always running."""

    def current_time(self) -> float:
        return self.read()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Time until ``deadline``, but never more than ``max_wait_s`` (epoll waits on CLOCK_MONOTONIC)."""
        return min(deadline - self.read(), self.max_wait_s)


@attrs.frozen(kw_only=True)
class Resumed:
    """The machine was suspended for ``suspended_for_s`` and is running again since about ``at``.

    ``at`` is on the run's clock (``trio.current_time()``) when the detector noticed.
    """

    suspended_for_s: float
    at: float


@attrs.frozen(kw_only=True)
class SuspendDetectorStatistics:
    """The detector's counters at one moment."""

    samples: int = 0
    resumes: int = 0
    total_suspended_s: float = 0.0
    last: Resumed | None = None


class SuspendDetector:
    """Reports each suspend as :class:`Resumed`, from the growth of ``BOOTTIME - MONOTONIC``.

    ``interval_s`` is the sampling period (it bounds how late a resume is
    noticed on a monotonic run clock; on :class:`BoottimeClock` the first loop
    wake-up after resume notices it); ``threshold_s`` the smallest growth
    reported.  The readers are the two kernel clocks unless a test injects
    others.
    """

    def __init__(
        self,
        *,
        interval_s: float = SUSPEND_SAMPLE_INTERVAL_S,
        threshold_s: float = SUSPEND_THRESHOLD_S,
        read_boottime: Reader = read_boottime,
        read_monotonic: Reader = read_monotonic,
    ) -> None:
        if not interval_s > 0 or not threshold_s > 0:
            raise ValueError(f"interval_s and threshold_s must be positive, got {interval_s!r}, {threshold_s!r}")
        self.interval_s = interval_s
        self.threshold_s = threshold_s
        self._read_boottime = read_boottime
        self._read_monotonic = read_monotonic
        self._stats = SuspendDetectorStatistics()
        self._poked = trio.Event()

    def check_now(self) -> None:
        """Compare the clocks at once instead of at the next sample (a hint says the machine resumed)."""
        self._poked.set()

    def statistics(self) -> SuspendDetectorStatistics:
        return self._stats

    def _gap(self) -> float:
        return self._read_boottime() - self._read_monotonic()

    async def serve(
        self,
        report: Callable[[Resumed], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Sample forever; call ``report`` (which must not block) once per suspend seen.

        Started with ``await nursery.start(detector.serve, report)``: the
        baseline is taken before ``started()``, so a suspend after that is
        never missed.  A suspend shorter than ``threshold_s`` is absorbed into
        the baseline and not reported.
        """
        baseline = self._gap()
        task_status.started()
        while True:
            with trio.move_on_after(self.interval_s):
                await self._poked.wait()
            self._poked = trio.Event()
            gap = self._gap()
            grown, baseline = gap - baseline, gap
            stats = self._stats
            if grown <= self.threshold_s:
                self._stats = attrs.evolve(stats, samples=stats.samples + 1)
                continue
            resumed = Resumed(suspended_for_s=grown, at=trio.current_time())
            self._stats = attrs.evolve(
                stats,
                samples=stats.samples + 1,
                resumes=stats.resumes + 1,
                total_suspended_s=stats.total_suspended_s + grown,
                last=resumed,
            )
            report(resumed)


@attrs.frozen
class KernelClocks:
    """The two clocks one process runs on: the run clock reads ``boottime``; the detector compares both."""

    boottime: Reader = read_boottime
    monotonic: Reader = read_monotonic

    def run_clock(self) -> BoottimeClock:
        return BoottimeClock(read=self.boottime)

    def suspend_detector(self) -> SuspendDetector:
        return SuspendDetector(read_boottime=self.boottime, read_monotonic=self.monotonic)


class ClockOffsetsError(ValueError):
    """A clock-offsets file that cannot be used; one line naming it."""


def offset_clocks(path: Path) -> KernelClocks:
    """The kernel clocks plus the two offsets in ``path`` (:data:`OFFSETS_FORMAT`), read at every reading.

    The file is mapped read-only, so another process's writes show at the next
    reading without a system call.  The writer must only ever move the
    boottime offset forward (a run clock never goes back), one aligned
    8-byte store at a time (``write_clock_offsets``).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ClockOffsetsError(f"clock offsets {path}: {exc.strerror}") from None
    try:
        if os.fstat(fd).st_size != OFFSETS_SIZE:
            raise ClockOffsetsError(f"clock offsets {path}: expected exactly {OFFSETS_SIZE} bytes")
        view = mmap.mmap(fd, OFFSETS_SIZE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)

    def boottime() -> float:
        offset: float = struct.unpack_from("=d", view, 0)[0]
        return read_boottime() + offset

    def monotonic() -> float:
        offset: float = struct.unpack_from("=d", view, 8)[0]
        return read_monotonic() + offset

    return KernelClocks(boottime=boottime, monotonic=monotonic)


def write_clock_offsets(path: Path, *, boottime: float, monotonic: float) -> None:
    """Set the offsets a process started with ``--clock-offsets path`` reads (creates the file)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != OFFSETS_SIZE:
            os.ftruncate(fd, OFFSETS_SIZE)
        os.pwrite(fd, struct.pack("=d", monotonic), 8)
        os.pwrite(fd, struct.pack("=d", boottime), 0)
    finally:
        os.close(fd)
