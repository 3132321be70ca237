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
handshake anew instead of waiting for timeouts.  This module only detects.  A logind ``PrepareForSleep`` signal over
D-Bus would be an earlier hint; it is not built (docs/spec.md).

Both clock readers are parameters, so tests move time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
            await trio.sleep(self.interval_s)
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
