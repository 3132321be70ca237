"""What every D-Bus client of the agent shares (resolved, logind, NetworkManager): the errors and names.

Each client keeps its own connection and its own words for a failure (the
log line says what is lost: DNS, the sleep hint, path costs); what a missing,
refusing or vanished bus raises, and how a peer's error reply is carried, is
the same for all of them.
"""

from __future__ import annotations

import trio
from jeepney.auth import AuthenticationError
from jeepney.io.common import RouterClosed

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
