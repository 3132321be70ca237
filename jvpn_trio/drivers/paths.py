"""The path manager: follows the machine's interfaces and publishes which paths are usable.

Theory of operation
-------------------
Paths follow the machine as netlink says (STYLE.md, "The world around the laptop"): an
interface plugged in later becomes a path, one that goes away is that path's news, and
the next hop is read from the kernel at every change, never remembered.

One task owns one :class:`PathManager`.  It subscribes to rtnetlink first (links,
addresses and routes of both families: :data:`~jvpn_trio.drivers.netlink.WATCH_PATHS`),
then reads the machine (:func:`~jvpn_trio.drivers.ifaces.read_machine_snapshot`: pyroute2
in a worker thread), so no change can fall between the two.  After that, every netlink
event, including a :class:`~jvpn_trio.drivers.netlink.Resync` after an overrun, only says
"something changed": the task waits ``settle_s`` more for the rest of the burst (one
``ip`` command or a DHCP client makes several changes at once), then reads everything
again.  Bad news does not wait, because a switch cannot start before it: a link that goes
down or away takes its path down at once, from the event itself
(:meth:`~jvpn_trio.core.candidates.PathTable.link_lost`, no read: a read of the machine
costs 10-25 ms of a worker thread); a burst that starts with an address or route removed is read at once.
Either way the read after the settle interval follows and reconciles.  What to make of a snapshot is decided by the pure rules of
:mod:`jvpn_trio.core.candidates`; the task sends the resulting events, in order, on a
bounded channel, and a slow consumer holds the task back rather than losing an event
(the netlink monitor then overruns and the next read catches up).

Failures are local.  An OS error about one interface marks that interface unusable in
that snapshot; a failed read of the whole machine takes every path down
(``READ_ERROR``) while keeping the path ids.  Either one is counted in
:meth:`PathManager.statistics`, logged at most once per :data:`LOG_INTERVAL_S` per
subject, and followed by another read after ``retry_s`` even if netlink stays quiet.
Nothing in this module raises because of the machine's state; only a failure to
subscribe to netlink at start does (for example an unknown ``netns``).

The reader and the wake-up source are parameters, so the task runs in unit tests on
scripted snapshots under Trio's mock clock.
"""

from __future__ import annotations

import functools
import math
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Protocol

import attrs
import trio

from jvpn_trio.core.candidates import (
    DownReason,
    MachineSnapshot,
    Path,
    PathAddressChanged,
    PathDown,
    PathEvent,
    PathForgotten,
    PathRules,
    PathTable,
    PathUp,
    gateway_family,
)
from jvpn_trio.drivers import ifaces
from jvpn_trio.drivers.log import LineLimiter, stderr_line
from jvpn_trio.drivers.netlink import (
    WATCH_PATHS,
    AddressEvent,
    LinkEvent,
    NetlinkError,
    Resync,
    RouteEvent,
    open_link_monitor,
)
from jvpn_trio.drivers.routes import RTPROT_JVPN
from jvpn_trio.errors import lone_exception_unwrapped

__all__ = [
    "DEFAULT_CHANNEL_SIZE",
    "DEFAULT_READ_RETRY_S",
    "DEFAULT_SETTLE_S",
    "DownReason",
    "LOG_INTERVAL_S",
    "Path",
    "PathAddressChanged",
    "PathDown",
    "PathForgotten",
    "PathEvent",
    "PathManager",
    "PathManagerStatistics",
    "PathUp",
    "StateReader",
    "Wakeups",
    "open_path_manager",
    "serve_path_manager",
]

#: How long to wait after a netlink event for the rest of its burst before reading the machine.
DEFAULT_SETTLE_S = 0.1
#: When a read failed (wholly, or for one interface), read again after this long even without events.
DEFAULT_READ_RETRY_S = 1.0
#: Path events buffered for a slow consumer before the manager waits for it.
DEFAULT_CHANNEL_SIZE = 64
#: At most one log line per subject (an interface, or the whole read) per this interval.
LOG_INTERVAL_S = 10.0

#: Reads the machine now; raises ``OSError`` or ``pyroute2.NetlinkError`` if it cannot read it at all.
StateReader = Callable[[], Awaitable[MachineSnapshot]]


class Wakeups(Protocol):
    """Where "something changed" comes from: a :class:`~jvpn_trio.drivers.netlink.LinkMonitor`, or a fake.

    ``receive`` raises ``trio.EndOfChannel`` when there will be no more.
    """

    async def receive(self) -> object: ...


@attrs.frozen(kw_only=True)
class PathManagerStatistics:
    """Counters of one path manager (frozen; a new record per call)."""

    paths: int  # usable paths now
    snapshots_read: int  # successful reads of the whole machine
    read_failures: int  # reads of the whole machine that failed: every path went down
    interface_errors: int  # interfaces found unreadable, summed over snapshots
    wakeups: int  # netlink events received (a burst is several)
    resyncs: int  # of which: the monitor overran and asked for a full re-read
    events_published: int
    log_lines_suppressed: int
    last_error: str | None  # the most recent failure, for a status view
    own_route_events: int = 0  # netlink events about our own routes: never a reason to read


class PathManager:
    """One path manager's state: the usable paths and its counters.  Driven by :func:`serve_path_manager`."""

    def __init__(
        self,
        *,
        rules: PathRules,
        gateway: str,
        read_state: StateReader,
        settle_s: float,
        retry_s: float,
        log: Callable[[str], None],
    ) -> None:
        if settle_s < 0 or retry_s <= 0:
            raise ValueError(f"settle_s must be >= 0 and retry_s > 0, got {settle_s} and {retry_s}")
        self._rules = rules
        self._family = gateway_family(gateway)  # ValueError for a non-address
        self._read_state = read_state
        self._settle_s = settle_s
        self._retry_s = retry_s
        self._log = log
        self._limiter = LineLimiter(LOG_INTERVAL_S)
        self._table = PathTable()
        self._retry_at = math.inf
        self._snapshots = 0
        self._read_failures = 0
        self._interface_errors = 0
        self._wakeups = 0
        self._resyncs = 0
        self._published = 0
        self._last_error: str | None = None
        self._own_route_events = 0

    @property
    def paths(self) -> tuple[Path, ...]:
        """The usable paths of the latest read, priority then name (events on the channel may lag behind)."""
        return self._table.paths

    def statistics(self) -> PathManagerStatistics:
        return PathManagerStatistics(
            paths=len(self._table.paths),
            snapshots_read=self._snapshots,
            read_failures=self._read_failures,
            interface_errors=self._interface_errors,
            wakeups=self._wakeups,
            resyncs=self._resyncs,
            events_published=self._published,
            log_lines_suppressed=self._limiter.suppressed,
            last_error=self._last_error,
            own_route_events=self._own_route_events,
        )

    def _report(self, subject: str, text: str, *, now: float) -> None:
        line = self._limiter.line(subject, text, now=now)
        if line is not None:
            self._log(line)

    async def _next_wakeup(self, wakeups: Wakeups) -> object:
        """The next event that may change what a read sees.

        Our own routes never do: they live in our tables or point into the TUN, and a read looks
        the gateway up *through* each interface, which neither answers.  Skipping them keeps the
        routing's own changes (a path added, a link's routes dropped by the kernel) from
        triggering a read of the whole machine, a worker thread's 10-25 ms of pyroute2 parsing
        that competes with the datapath for the GIL.
        """
        while True:
            event = await wakeups.receive()
            if not (isinstance(event, RouteEvent) and event.protocol == RTPROT_JVPN):
                return event
            self._own_route_events += 1

    def _woken(self, event: object) -> None:
        self._wakeups += 1
        if isinstance(event, Resync):
            self._resyncs += 1

    async def _read(self) -> tuple[PathEvent, ...]:
        """Read the machine once and update the table; returns the events to publish."""
        now = trio.current_time()
        try:
            snapshot = await self._read_state()
        except (OSError, NetlinkError) as exc:
            self._read_failures += 1
            self._last_error = ifaces.describe_os_error(exc)
            self._retry_at = now + self._retry_s
            self._report("*", f"path manager: cannot read the interfaces ({self._last_error}); "
                              f"every path is down until a read succeeds", now=now)
            self._table, diff = self._table.unreadable()
            return diff.events()
        self._snapshots += 1
        self._retry_at = math.inf
        for iface in snapshot.interfaces:
            if iface.error is not None:
                self._interface_errors += 1
                self._last_error = f"{iface.name}: {iface.error}"
                self._retry_at = now + self._retry_s
                self._report(iface.name, f"path manager: {iface.name} is not usable now ({iface.error})", now=now)
        self._table, diff = self._table.update(snapshot, self._rules, self._family)
        return diff.events()

    async def _publish(self, send: trio.MemorySendChannel[PathEvent], events: tuple[PathEvent, ...]) -> None:
        for event in events:
            await send.send(event)
            self._published += 1

    async def _news_that_cannot_wait(self, event: object) -> tuple[PathEvent, ...]:
        """A loss that opens a burst, reported before the burst settles (nothing for any other event)."""
        if isinstance(event, LinkEvent) and (event.removed or not event.up):
            self._table, diff = self._table.link_lost(event.index, removed=event.removed)
            return diff.events()
        if isinstance(event, (AddressEvent, RouteEvent)) and not event.added:
            return await self._read()
        return ()

    async def _settle(self, wakeups: Wakeups) -> bool:
        """Take in the rest of a burst for ``settle_s``; True if the wake-up source ended meanwhile."""
        with trio.move_on_after(self._settle_s):
            while True:
                try:
                    self._woken(await self._next_wakeup(wakeups))
                except trio.EndOfChannel:
                    return True
        return False

    async def _serve(
        self,
        send: trio.MemorySendChannel[PathEvent],
        wakeups: Wakeups,
        task_status: trio.TaskStatus[PathManager],
    ) -> None:
        async with send:
            events = await self._read()
            task_status.started(self)
            await self._publish(send, events)
            while True:
                ended = False
                with trio.move_on_at(self._retry_at):
                    try:
                        first = await self._next_wakeup(wakeups)
                    except trio.EndOfChannel:
                        return
                    self._woken(first)
                    await self._publish(send, await self._news_that_cannot_wait(first))  # the settled read follows
                    ended = await self._settle(wakeups)
                await self._publish(send, await self._read())
                if ended:
                    return


async def serve_path_manager(
    send_channel: trio.MemorySendChannel[PathEvent],
    rules: PathRules,
    gateway: str,
    *,
    netns: str | None = None,
    settle_s: float = DEFAULT_SETTLE_S,
    retry_s: float = DEFAULT_READ_RETRY_S,
    read_state: StateReader | None = None,
    wakeups: Wakeups | None = None,
    log: Callable[[str], None] = stderr_line,
    lookup_mark: int | None = None,
    task_status: trio.TaskStatus[PathManager] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish :class:`PathUp` / :class:`PathDown` / :class:`PathAddressChanged` on ``send_channel`` until cancelled.

    ``task_status.started(manager)`` comes once the first snapshot is read (or failed to
    read); the events for that snapshot follow on the channel, so a consumer starts from
    "no paths" and sees a :class:`PathUp` for each path usable at start.  ``gateway`` is the
    gateway's literal address (its family decides which addresses and routes count).

    By default the task listens to netlink in ``netns`` and reads the machine with
    :func:`~jvpn_trio.drivers.ifaces.read_machine_snapshot`; ``wakeups`` and ``read_state``
    replace them (tests); ``lookup_mark`` marks its route lookups
    (:func:`~jvpn_trio.drivers.ifaces.read_machine_snapshot`).  Returns, closing
    ``send_channel``, only if ``wakeups`` ends.
    Raises ``ValueError`` for bad parameters and ``OSError`` if netlink cannot be
    subscribed to; never because of the machine's state (see the module docstring).
    """
    reader = read_state or functools.partial(
        ifaces.read_machine_snapshot, rules, gateway, netns=netns, lookup_mark=lookup_mark
    )
    manager = PathManager(rules=rules, gateway=gateway, read_state=reader, settle_s=settle_s, retry_s=retry_s, log=log)
    if wakeups is not None:
        await manager._serve(send_channel, wakeups, task_status)
        return
    async with open_link_monitor(netns=netns, watch=WATCH_PATHS) as monitor:
        await manager._serve(send_channel, monitor, task_status)


@asynccontextmanager
async def open_path_manager(
    rules: PathRules,
    gateway: str,
    *,
    channel_size: int = DEFAULT_CHANNEL_SIZE,
    netns: str | None = None,
    settle_s: float = DEFAULT_SETTLE_S,
    retry_s: float = DEFAULT_READ_RETRY_S,
    read_state: StateReader | None = None,
    wakeups: Wakeups | None = None,
    log: Callable[[str], None] = stderr_line,
    lookup_mark: int | None = None,
) -> AsyncIterator[tuple[PathManager, trio.MemoryReceiveChannel[PathEvent]]]:
    """Run :func:`serve_path_manager` for the block: ``async with open_path_manager(...) as (manager, events)``.

    Entered once the first snapshot is read; ``events`` is the bounded receiving end
    (``channel_size``).  The task stops when the block exits.
    """
    if channel_size < 1:
        raise ValueError(f"channel_size must be >= 1, got {channel_size}")
    send, receive = trio.open_memory_channel[PathEvent](channel_size)
    async with lone_exception_unwrapped(), trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_path_manager, send, rules, gateway, netns=netns, settle_s=settle_s, retry_s=retry_s,
            read_state=read_state, wakeups=wakeups, log=log, lookup_mark=lookup_mark,
        )
        manager: PathManager = await nursery.start(serve)
        try:
            async with receive:
                yield manager, receive
        finally:
            nursery.cancel_scope.cancel()
