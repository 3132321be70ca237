"""What every long-running command needs from the host: the privilege check, signals, limits.

Shared by ``serve`` and ``up``; a command that cannot run as configured raises
:class:`AppError`, which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Callable

import trio

#: Events waiting for the log writer; beyond this they are dropped and counted.
EVENT_SINK_CAPACITY = 4096
CAP_NET_ADMIN = 12


def address_family(host: str) -> int:
    """The socket family of a numeric address: AF_INET6 if it has a colon, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class AppError(Exception):
    """A reason the program cannot run as configured: one line for the user, exit code 2."""


def missing_privilege(status_path: str = "/proc/self/status", tun_path: str = "/dev/net/tun") -> str | None:
    """Why this process cannot create TUN devices and routes, or None if it can.

    The capability decides, not the uid: root in a container may lack
    CAP_NET_ADMIN, and a non-root process may have been granted it.
    """
    if not os.path.exists(tun_path):
        return f"{tun_path} is missing (load the tun module or run where TUN devices exist)"
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
                        return None
                    break
    except (OSError, ValueError):
        if os.geteuid() == 0:
            return None  # no /proc to ask: trust root, the TUN driver reports a refusal in one line
    return "needs root or CAP_NET_ADMIN to create TUN devices and routes (try sudo)"


async def close_on_signals(submit: Callable[[], Any], cancel_scope: trio.CancelScope) -> None:
    """SIGINT/SIGTERM: ask for an explicit close first; a second signal cancels at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for _ in signals:
            count += 1
            if count == 1:
                submit()
            else:
                cancel_scope.cancel()
