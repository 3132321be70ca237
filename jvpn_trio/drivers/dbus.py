"""What every D-Bus client of the agent shares (resolved, logind, NetworkManager): the errors and names.

Each client keeps its own connection and its own words for a failure (the
log line says what is lost: DNS, the sleep hint, path costs); what a missing,
refusing or vanished bus raises, and how a peer's error reply is carried, is
the same for all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from jeepney.auth import AuthenticationError
from jeepney.bus import get_bus
from jeepney.io.common import RouterClosed
from jeepney.io.trio import DBusConnection, open_dbus_connection

from jvpn_trio.errors import describe, first_leaf

#: What a bus that is missing, refuses us or goes away raises from jeepney and Trio.
BUS_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.EndOfChannel,
    AuthenticationError,
    RouterClosed,
)

#: The bus daemon's answer for a name nobody owns (the service is not running).
NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"


class CallFailed(Exception):
    """The peer answered a method call with a D-Bus error; ``name`` is the error's name."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)
        self.name = name


def bus_label(bus_address: str | None) -> str:
    """How a log line names the bus: the address given, else "the system bus"."""
    return bus_address if bus_address is not None else "the system bus"


#: Set-up run on a fresh connection (subscribe, check a name): None when done, else why not.
Setup = Callable[[DBusConnection, str], Awaitable["str | None"]]


async def connect_bus(bus_address: str | None, *, timeout_s: float, setup: Setup) -> tuple[DBusConnection | None, str]:
    """A connection to the bus (``None``: the system bus) on which ``setup`` succeeded; or None and why not.

    ``setup`` gets the connection and the bus's name for its messages.  Everything,
    set-up included, is bounded by ``timeout_s``; a connection that failed is closed.
    """
    bus = bus_address if bus_address is not None else "SYSTEM"
    label = bus_label(bus_address)
    try:
        socket_path = get_bus(bus)
    except (RuntimeError, ValueError) as exc:  # jeepney's parse of the address (bus.py)
        return None, f"unusable D-Bus address for {label}: {describe(exc)}"
    where = f"{label} at {socket_path}" if bus_address is None else label
    conn: DBusConnection | None = None
    failure: str | None = None
    with trio.move_on_after(timeout_s) as scope:
        try:
            conn = await open_dbus_connection(bus)
            failure = await setup(conn, where)
        except* BUS_ERRORS as group:
            failure = f"cannot use {where}: {describe(first_leaf(group))}"
    if scope.cancelled_caught:
        failure = f"{where} did not answer within {timeout_s:g} s"
    if failure is None and conn is not None:
        return conn, ""
    if conn is not None:
        await conn.aclose()
    return None, failure or f"cannot use {where}"
