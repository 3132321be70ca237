"""NetworkManager's ``Metered`` property: whether a path's bytes cost money, as the machine knows it.

Why
---
A ``[[path]]`` rule may say ``metered = true/false``; without it the kind
decides (LTE is metered, ``core/candidates.py`` ``KIND_METERED``).  Where
NetworkManager runs it knows better than the kind: a phone's hotspot seen as
Wi-Fi, a network the user marked metered by hand, a DHCP server announcing
``ANDROID_METERED``.  NM publishes that per device as the ``Metered``
property (``u``) of ``org.freedesktop.NetworkManager.Device``, found with
``org.freedesktop.NetworkManager.GetDeviceByIpIface(s) -> o``; the values are
NM's ``NMMetered`` enum (https://networkmanager.dev/docs/api/latest/nm-dbus-types.html#NMMetered,
https://networkmanager.dev/docs/api/latest/gdbus-org.freedesktop.NetworkManager.Device.html).
NM's own advice is to treat GUESS_YES like YES; we also keep UNKNOWN apart
(no opinion: the configuration decides) rather than reading it as "free".

Precedence (:class:`PathCost`, the one place that knows it): an explicit
``metered`` in the path's ``[[path]]`` rule, then NetworkManager's opinion,
then the kind's default.  A path whose rule sets ``metered`` is never looked
up in NM at all.

Theory of operation
-------------------
:meth:`NetworkManagerCosts.serve` opens one connection to the system bus for
the agent's life (bounded by ``connect_timeout_s``), subscribes to
``org.freedesktop.DBus.Properties.PropertiesChanged`` from NM's devices
(``arg0`` = the Device interface), and checks that NM owns its name.  Then
two tasks share the connection: the *reader* dispatches every message (a
reply to whoever waits for it, a signal to the follower's callback), and the
*looker-up* takes the interfaces :meth:`~NetworkManagerCosts.watch_nowait`
queued, asks for each one's device and its ``Metered``, each call bounded by
``call_timeout_s``.  Every opinion reaches ``on_change(ifname, opinion)`` in
the order NM sent it: a reply that the reader saw before a later signal for
the same device is not delivered after that signal.

Nothing here can stall the agent: :meth:`~NetworkManagerCosts.watch_nowait`
only queues, the callback must not block, and method calls never start NM
(``NO_AUTO_START``).  No system bus, no NetworkManager, or a bus that goes
away are not errors: one log line, the reason in
:meth:`~NetworkManagerCosts.statistics`, and path costs stay what the
configuration says.  It does not reconnect, and a restarted NM (new device
objects) is followed again only when a path comes up again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio
from jeepney import (
    DBusAddress,
    HeaderFields,
    MatchRule,
    Message,
    MessageFlag,
    MessageType,
    message_bus,
    new_method_call,
)
from jeepney.io.trio import DBusConnection

from jvpn_trio.core import events as ev
from jvpn_trio.core.candidates import PathCost
from jvpn_trio.core.ids import PathId
from jvpn_trio.drivers.client import ClientPath
from jvpn_trio.drivers.dbus import BUS_ERRORS, NAME_HAS_NO_OWNER, CallFailed, bus_label, connect_bus
from jvpn_trio.drivers.log import stderr_line
from jvpn_trio.errors import describe

NM_BUS_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
NM_INTERFACE = "org.freedesktop.NetworkManager"
NM_DEVICE_INTERFACE = "org.freedesktop.NetworkManager.Device"
#: Where NM's device objects live (``/org/freedesktop/NetworkManager/Devices/<n>``).
NM_DEVICES_PATH = "/org/freedesktop/NetworkManager/Devices"
GET_DEVICE_BY_IP_IFACE = "GetDeviceByIpIface"
METERED_PROPERTY = "Metered"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
PROPERTIES_CHANGED = "PropertiesChanged"
#: The signal's body: the interface, the changed properties, the invalidated ones.
PROPERTIES_CHANGED_SIGNATURE = "sa{sv}as"
#: How long connecting, subscribing and finding NM may take, in seconds: a local bus answers in
#: milliseconds; the bound keeps a wedged bus from holding anything up.
CONNECT_TIMEOUT_S = 5.0
#: How long one call to NM (a device lookup, a property read) may take, in seconds.  Nothing
#: waits on it but the looker-up; past it the path keeps its configured cost.
CALL_TIMEOUT_S = 2.0


class NmMetered(enum.IntEnum):
    """NetworkManager's ``NMMetered`` values, as the device's ``Metered`` property carries them."""

    UNKNOWN = 0
    YES = 1
    NO = 2
    GUESS_YES = 3
    GUESS_NO = 4


_OPINIONS: dict[int, bool | None] = {
    NmMetered.UNKNOWN: None,
    NmMetered.YES: True,
    NmMetered.NO: False,
    NmMetered.GUESS_YES: True,
    NmMetered.GUESS_NO: False,
}


def network_manager_opinion(value: int) -> bool | None:
    """True (metered), False (not) or None (no opinion) for a ``Metered`` value.

    A value NM may add later is no opinion either: the configuration decides.
    """
    return _OPINIONS.get(value)


def cost_change(
    paths: Mapping[PathId, ClientPath], costs: Mapping[PathId, PathCost], ifname: str, opinion: bool | None
) -> ev.PathCostChanged | None:
    """The input NM's ``opinion`` on ``ifname`` makes for the agent; None when its cost stays."""
    for path in paths.values():
        if path.name != ifname:
            continue
        cost = costs.get(path.path)
        if cost is None:
            return None
        metered = cost.metered(opinion)
        return None if metered == path.metered else ev.PathCostChanged(path=path.path, metered=metered)
    return None


@attrs.frozen(kw_only=True)
class NetworkManagerStatistics:
    """The follower's counters at one moment.

    ``connected`` is true while subscribed; ``unavailable_reason`` says why NM's
    opinion is not (or no longer) followed, None while it is or before ``serve``.
    """

    connected: bool = False
    watched: int = 0  # interfaces followed now
    opinions: int = 0  # values delivered to the callback (a read or a change)
    unmanaged: int = 0  # interfaces NM refused to name a device for (not its, or a modem not connected)
    failed_calls: int = 0  # calls NM answered with another error, or not within call_timeout_s
    malformed: int = 0  # replies or signals of the wrong shape
    ignored: int = 0  # PropertiesChanged sent to us alone: not NM's broadcast
    unavailable_reason: str | None = None


class _Reply:
    """A call's reply, filled in by the reader with the message's place in the stream."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: Message | None = None
        self.seq = 0


def _match_rule() -> MatchRule:
    """Every device's PropertiesChanged for the Device interface; the bus resolves ``sender`` to NM's owner."""
    rule = MatchRule(
        type="signal",
        sender=NM_BUS_NAME,
        interface=PROPERTIES_INTERFACE,
        member=PROPERTIES_CHANGED,
        path_namespace=NM_DEVICES_PATH,
    )
    rule.add_arg_condition(0, NM_DEVICE_INTERFACE)
    return rule


def _no_auto_start(msg: Message) -> Message:
    """A call that must not start NM through bus activation: its absence is the answer."""
    msg.header.flags |= MessageFlag.no_auto_start
    return msg


class NetworkManagerCosts:
    """Follows NM's ``Metered`` for the interfaces it is asked to watch; see the module docstring.

    ``bus_address`` is a D-Bus address (``unix:path=...``); None means the
    system bus.  ``log`` receives the one line written when NM is unavailable.
    """

    def __init__(
        self,
        *,
        bus_address: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        call_timeout_s: float = CALL_TIMEOUT_S,
        log: Callable[[str], None] = stderr_line,
    ) -> None:
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s!r}")
        if not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be positive, got {call_timeout_s!r}")
        self.bus_address = bus_address
        self.connect_timeout_s = connect_timeout_s
        self.call_timeout_s = call_timeout_s
        self._log = log
        self._stats = NetworkManagerStatistics()
        #: False once serve() gave up: watching is then a no-op.
        self._available = True
        #: Each watched interface's generation: a lookup answered after an unwatch (or a new watch) is dropped.
        self._watched: dict[str, int] = {}
        self._generation = 0
        #: Interfaces waiting for a lookup, in order (a dict as an ordered set).
        self._queued: dict[str, None] = {}
        self._wake = trio.Event()
        #: NM's device object path -> the interface it is watched for.
        self._devices: dict[str, str] = {}
        #: Per interface, the place in the stream of the message whose value was delivered last.
        self._delivered: dict[str, int] = {}
        self._replies: dict[int, _Reply] = {}
        self._seq = 0

    def statistics(self) -> NetworkManagerStatistics:
        return attrs.evolve(self._stats, watched=len(self._watched))

    # -- what to follow -----------------------------------------------------------------------
    def watch_nowait(self, ifname: str) -> None:
        """Follow ``ifname``: its current ``Metered`` and every change reach the callback."""
        if not self._available:
            return
        self._generation += 1
        self._watched[ifname] = self._generation
        self._forget_device(ifname)
        self._queued[ifname] = None
        self._wake.set()

    def unwatch_nowait(self, ifname: str) -> None:
        """Stop following ``ifname`` (its path went down); nothing more is delivered for it."""
        self._watched.pop(ifname, None)
        self._queued.pop(ifname, None)
        self._delivered.pop(ifname, None)
        self._forget_device(ifname)

    def _forget_device(self, ifname: str) -> None:
        for device in [d for d, name in self._devices.items() if name == ifname]:
            del self._devices[device]

    # -- lifetime -----------------------------------------------------------------------------
    async def serve(
        self,
        on_change: Callable[[str, bool | None], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow NM until cancelled; ``on_change(ifname, opinion)`` must not block.

        Started once the subscription is in place, or once NM turned out to be
        unavailable.  Returns (never raises) when there is no bus, no NM, or the
        bus goes away, after one log line and with ``unavailable_reason`` set.
        """
        conn, reason = await self._connect()
        if conn is None:
            self._unavailable(reason)
            task_status.started()
            return
        async with conn:
            self._stats = attrs.evolve(self._stats, connected=True, unavailable_reason=None)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._look_up_queued, conn, on_change)
                reason = await self._receive(conn, on_change)
                nursery.cancel_scope.cancel()
        self._unavailable(reason)

    def _where(self) -> str:
        return bus_label(self.bus_address)

    def _unavailable(self, reason: str) -> None:
        self._available = False
        self._watched.clear()
        self._queued.clear()
        self._devices.clear()
        self._stats = attrs.evolve(self._stats, connected=False, unavailable_reason=reason)
        self._log(f"NetworkManager's Metered property unavailable ({reason}); path costs come from the configuration")

    async def _connect(self) -> tuple[DBusConnection | None, str]:
        """A connection subscribed to NM's device changes, with NM running; or None and why not."""
        return await connect_bus(self.bus_address, timeout_s=self.connect_timeout_s, setup=self._subscribe)

    async def _subscribe(self, conn: DBusConnection, where: str) -> str | None:
        """Subscribe to device changes and check NM runs: None, else why not."""
        try:
            await self._direct_call(conn, message_bus.AddMatch(_match_rule()))
            await self._direct_call(conn, message_bus.GetNameOwner(NM_BUS_NAME))
        except CallFailed as exc:
            if exc.name == NAME_HAS_NO_OWNER:
                return f"NetworkManager is not running on {where}"
            return f"{where} refused: {exc}"
        return None

    @staticmethod
    async def _direct_call(conn: DBusConnection, msg: Message) -> tuple[Any, ...]:
        """A call while nothing else reads the connection (set-up); other messages are dropped."""
        serial = next(conn.outgoing_serial)
        await conn.send(msg, serial=serial)
        while True:
            reply = await conn.receive()
            if reply.header.fields.get(HeaderFields.reply_serial) == serial:
                return _body_or_raise(reply)

    # -- the reader ---------------------------------------------------------------------------
    async def _receive(self, conn: DBusConnection, on_change: Callable[[str, bool | None], None]) -> str:
        """Dispatch until the bus goes away; returns why it went."""
        try:
            while True:
                msg = await conn.receive()
                self._seq += 1
                serial = msg.header.fields.get(HeaderFields.reply_serial)
                if serial is not None:
                    waiting = self._replies.pop(serial, None)
                    if waiting is not None:
                        waiting.message, waiting.seq = msg, self._seq
                        waiting.done.set()
                    continue
                self._signal(msg, on_change)
        except trio.EndOfChannel:
            return f"{self._where()} closed the connection"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"lost the connection to {self._where()}: {describe(exc)}"

    def _signal(self, msg: Message, on_change: Callable[[str, bool | None], None]) -> None:
        """A device's PropertiesChanged: its new ``Metered``, if it carries one for a watched device."""
        header = msg.header
        fields = header.fields
        if (
            header.message_type is not MessageType.signal
            or fields.get(HeaderFields.interface) != PROPERTIES_INTERFACE
            or fields.get(HeaderFields.member) != PROPERTIES_CHANGED
        ):
            return  # not ours (the bus's NameAcquired): uncounted
        if HeaderFields.destination in fields:
            self._stats = attrs.evolve(self._stats, ignored=self._stats.ignored + 1)
            return
        ifname = self._devices.get(str(fields.get(HeaderFields.path)))
        if ifname is None:
            return  # a device no path of ours is on
        body = msg.body
        if fields.get(HeaderFields.signature) != PROPERTIES_CHANGED_SIGNATURE or len(body) != 3:
            self._malformed()
            return
        interface, changed, invalidated = body
        if interface != NM_DEVICE_INTERFACE:
            return
        if METERED_PROPERTY in changed:
            self._deliver(ifname, changed[METERED_PROPERTY], self._seq, on_change)
        elif METERED_PROPERTY in invalidated:  # changed without its value: read it again
            self._queued[ifname] = None
            self._wake.set()

    def _deliver(self, ifname: str, variant: Any, seq: int, on_change: Callable[[str, bool | None], None]) -> None:
        """Hand a ``Metered`` variant to the callback, unless a later message's value went first."""
        if not (isinstance(variant, tuple) and len(variant) == 2 and variant[0] == "u" and isinstance(variant[1], int)):
            self._malformed()
            return
        if seq <= self._delivered.get(ifname, 0):
            return
        self._delivered[ifname] = seq
        self._stats = attrs.evolve(self._stats, opinions=self._stats.opinions + 1)
        on_change(ifname, network_manager_opinion(variant[1]))

    def _malformed(self) -> None:
        self._stats = attrs.evolve(self._stats, malformed=self._stats.malformed + 1)

    # -- the looker-up ------------------------------------------------------------------------
    async def _look_up_queued(self, conn: DBusConnection, on_change: Callable[[str, bool | None], None]) -> None:
        """Look up each queued interface in turn; a bus error ends it (the reader says why)."""
        try:
            while True:
                while not self._queued:
                    self._wake = trio.Event()
                    await self._wake.wait()
                ifname = next(iter(self._queued))
                del self._queued[ifname]
                await self._look_up(conn, ifname, on_change)
        except BUS_ERRORS:
            return

    async def _look_up(self, conn: DBusConnection, ifname: str, on_change: Callable[[str, bool | None], None]) -> None:
        """Find ``ifname``'s device, follow it, read its ``Metered``; a failure leaves the configured cost."""
        generation = self._watched.get(ifname)
        if generation is None:
            return
        manager = DBusAddress(NM_PATH, bus_name=NM_BUS_NAME, interface=NM_INTERFACE)
        try:
            (device,), _ = await self._call(conn, new_method_call(manager, GET_DEVICE_BY_IP_IFACE, "s", (ifname,)))
            if not isinstance(device, str):
                self._malformed()
                return
            if self._watched.get(ifname) != generation:
                return
            # Followed before the read, so no change between the read and the first signal is lost.
            self._devices[device] = ifname
            properties = DBusAddress(device, bus_name=NM_BUS_NAME, interface=PROPERTIES_INTERFACE)
            get = new_method_call(properties, "Get", "ss", (NM_DEVICE_INTERFACE, METERED_PROPERTY))
            (variant,), seq = await self._call(conn, get)
        except CallFailed as exc:
            self._count_failure(exc)
            return
        except trio.TooSlowError:
            self._stats = attrs.evolve(self._stats, failed_calls=self._stats.failed_calls + 1)
            return
        except ValueError:  # a reply without exactly one value
            self._malformed()
            return
        if self._watched.get(ifname) == generation:
            self._deliver(ifname, variant, seq, on_change)

    def _count_failure(self, exc: CallFailed) -> None:
        if exc.name.startswith(NM_INTERFACE + "."):  # e.g. UnknownDevice: not an interface NM manages
            self._stats = attrs.evolve(self._stats, unmanaged=self._stats.unmanaged + 1)
        else:
            self._stats = attrs.evolve(self._stats, failed_calls=self._stats.failed_calls + 1)

    async def _call(self, conn: DBusConnection, msg: Message) -> tuple[tuple[Any, ...], int]:
        """Send a call and wait (at most ``call_timeout_s``) for the reader to hand over its reply.

        Returns the reply's body and its place in the stream; raises CallFailed,
        trio.TooSlowError or one of BUS_ERRORS.
        """
        serial = next(conn.outgoing_serial)
        reply = self._replies[serial] = _Reply()
        try:
            with trio.fail_after(self.call_timeout_s):
                await conn.send(_no_auto_start(msg), serial=serial)
                await reply.done.wait()
        finally:
            self._replies.pop(serial, None)
        assert reply.message is not None
        return _body_or_raise(reply.message), reply.seq


def _body_or_raise(reply: Message) -> tuple[Any, ...]:
    header = reply.header
    if header.message_type is MessageType.error:
        name = str(header.fields.get(HeaderFields.error_name, "unknown D-Bus error"))
        body = reply.body
        raise CallFailed(name, str(body[0]) if body and isinstance(body[0], str) else "")
    return tuple(reply.body)
