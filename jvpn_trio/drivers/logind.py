"""logind's ``PrepareForSleep`` signal: a hint just before the machine sleeps and right at resume.

Why
---
:class:`~jvpn_trio.drivers.clock.SuspendDetector` learns of a suspend by
comparing two kernel clocks once a second, so it hears of it only after the
resume, up to a second late, and never before.  systemd-logind announces both
edges on the system bus: ``PrepareForSleep(true)`` just before the machine
sleeps and ``PrepareForSleep(false)`` as soon as it has resumed.  The agent
takes the second as an immediate "resumed" hint and the first as "about to
sleep" (a log line, a counter).  The clock detector stays the authority: it
also covers machines without logind or without a system bus.

We speak D-Bus through jeepney: pure Python (no libdbus, nothing to compile),
with a Trio integration (``jeepney.io.trio``).

Theory of operation
-------------------
:meth:`SleepSignals.serve` opens its own connection (``open_dbus_connection``:
authentication and ``Hello``), asks the bus with ``AddMatch`` for exactly one
signal (type, sender ``org.freedesktop.login1``, path, interface, member),
waits for the bus to confirm, and only then calls ``task_status.started()``.
It then reads the connection itself in one task: the connection carries
nothing else we asked for, so jeepney's router (a second task and a filter
channel that drops silently when full) would add nothing but a nursery.

The bus checks the sender of a broadcast against the match rule (it follows
the well-known name to its current owner), but it delivers a signal sent to
our connection alone (a ``destination`` header) without consulting any rule.
logind always broadcasts, so a ``PrepareForSleep`` with a destination is
someone else's and is counted as ``ignored``.  A body other than one boolean
(signature ``b``) is counted as ``malformed``.  Neither calls a callback.

No system bus (no socket, connection refused, permission denied, a bus that
does not answer within ``connect_timeout_s``) and a bus that goes away later
are not errors: the hint is optional.  ``serve`` then logs one line, records
the reason in :meth:`SleepSignals.statistics`, calls ``task_status.started()``
if it had not, and returns.  It does not reconnect.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio
from jeepney import HeaderFields, MatchRule, Message, MessageType, message_bus
from jeepney.io.trio import DBusConnection

from jvpn_trio.drivers.dbus import bus_label, connect_bus
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.errors import describe

#: Who sends the signal, from where (``org.freedesktop.login1(5)``).
LOGIND_BUS_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_INTERFACE = "org.freedesktop.login1.Manager"
PREPARE_FOR_SLEEP = "PrepareForSleep"
#: The signal's body: one boolean, true before sleeping, false after resuming.
PREPARE_FOR_SLEEP_SIGNATURE = "b"
#: How long connecting and subscribing may take before the hint is given up, in seconds.  The
#: system bus answers a local client in milliseconds; the bound only keeps a wedged bus (or a
#: socket that accepts and never speaks) from holding up ``nursery.start`` for ever.
CONNECT_TIMEOUT_S = 5.0


@attrs.frozen(kw_only=True)
class SleepSignalsStatistics:
    """The listener's counters at one moment.

    ``connected`` is true while subscribed; ``unavailable_reason`` says why the
    hint is not (or no longer) available, None while it is or before ``serve``.
    """

    connected: bool = False
    sleeps: int = 0
    resumes: int = 0
    malformed: int = 0
    ignored: int = 0
    unavailable_reason: str | None = None


def _match_rule() -> MatchRule:
    """The one signal we subscribe to; the bus resolves ``sender`` to the name's current owner."""
    return MatchRule(
        type="signal",
        sender=LOGIND_BUS_NAME,
        path=LOGIND_PATH,
        interface=LOGIND_INTERFACE,
        member=PREPARE_FOR_SLEEP,
    )


class SleepSignals:
    """Calls ``on_sleep`` / ``on_resume`` on logind's ``PrepareForSleep(true / false)``.

    ``bus_address`` is a D-Bus address (``unix:path=...``); None means the
    system bus (``DBUS_SYSTEM_BUS_ADDRESS`` or its standard socket).
    ``connect_timeout_s`` bounds connecting and subscribing; ``log`` receives
    the one line written when the hint is unavailable.
    """

    def __init__(
        self,
        *,
        bus_address: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        log: Callable[[str], None] = stderr_line,
    ) -> None:
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s!r}")
        self.bus_address = bus_address
        self.connect_timeout_s = connect_timeout_s
        self._log = log
        self._stats = SleepSignalsStatistics()

    def statistics(self) -> SleepSignalsStatistics:
        return self._stats

    async def serve(
        self,
        on_sleep: Callable[[], None],
        on_resume: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe, then call ``on_sleep`` / ``on_resume`` (which must not block) per signal.

        Started with ``await nursery.start(signals.serve, on_sleep, on_resume)``,
        which returns once the bus has confirmed the subscription, so no signal
        sent after that is missed, or once the hint turned out to be unavailable.
        Returns (never raises) when there is no bus or the bus goes away, after
        one log line and with ``unavailable_reason`` set; runs until cancelled
        otherwise.
        """
        conn, reason = await self._connect()
        if conn is None:
            self._unavailable(reason)
            task_status.started()
            return
        async with conn:
            self._stats = attrs.evolve(self._stats, connected=True, unavailable_reason=None)
            task_status.started()
            reason = await self._receive(conn, on_sleep, on_resume)
        self._unavailable(reason)

    def _where(self) -> str:
        return bus_label(self.bus_address)

    def _unavailable(self, reason: str) -> None:
        self._stats = attrs.evolve(self._stats, connected=False, unavailable_reason=reason)
        self._log(
            f"logind sleep/resume hint unavailable ({reason}); suspends are still noticed by the clock"
        )

    async def _connect(self) -> tuple[DBusConnection | None, str]:
        """A connection subscribed to the signal, or None and why not."""
        return await connect_bus(
            self.bus_address, timeout_s=self.connect_timeout_s, setup=lambda conn, _where: self._subscribe(conn)
        )

    async def _subscribe(self, conn: DBusConnection) -> str | None:
        """Send ``AddMatch`` and wait for its reply; None when subscribed, else the bus's refusal."""
        serial = next(conn.outgoing_serial)
        await conn.send(message_bus.AddMatch(_match_rule()), serial=serial)
        while True:
            msg = await conn.receive()
            header = msg.header
            if header.fields.get(HeaderFields.reply_serial) != serial:
                # Without the match in place only a signal sent to us alone can arrive: not logind's.
                self._sleep_edge(msg, expected=False)
                continue
            if header.message_type is MessageType.error:
                name = header.fields.get(HeaderFields.error_name)
                return f"the bus refused the subscription: {name} {msg.body!r}"
            return None

    async def _receive(self, conn: DBusConnection, on_sleep: Callable[[], None], on_resume: Callable[[], None]) -> str:
        """Dispatch until the bus goes away; returns why it went."""
        try:
            while True:
                msg = await conn.receive()
                start = self._sleep_edge(msg)
                if start is True:
                    on_sleep()
                elif start is False:
                    on_resume()
        except trio.EndOfChannel:
            return f"{self._where()} closed the connection"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"lost the connection to {self._where()}: {describe(exc)}"

    def _sleep_edge(self, msg: Message, *, expected: bool = True) -> bool | None:
        """The signal's boolean (true: about to sleep), counted; None for anything else, counted if ours.

        Other messages (the bus's own ``NameAcquired``, a method call) are not
        ours and are dropped uncounted.  ``expected`` is false before the bus has
        confirmed the subscription, when a matching signal cannot be logind's.
        """
        header = msg.header
        fields = header.fields
        if (
            header.message_type is not MessageType.signal
            or fields.get(HeaderFields.interface) != LOGIND_INTERFACE
            or fields.get(HeaderFields.member) != PREPARE_FOR_SLEEP
        ):
            return None
        stats = self._stats
        if not expected or HeaderFields.destination in fields or fields.get(HeaderFields.path) != LOGIND_PATH:
            self._stats = attrs.evolve(stats, ignored=stats.ignored + 1)
            return None
        body = msg.body
        if (
            fields.get(HeaderFields.signature) != PREPARE_FOR_SLEEP_SIGNATURE
            or len(body) != 1
            or not isinstance(body[0], bool)
        ):
            self._stats = attrs.evolve(stats, malformed=stats.malformed + 1)
            return None
        start: bool = body[0]
        if start:
            self._stats = attrs.evolve(stats, sleeps=stats.sleeps + 1)
        else:
            self._stats = attrs.evolve(stats, resumes=stats.resumes + 1)
        return start
