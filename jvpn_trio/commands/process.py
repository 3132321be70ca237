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
#: The capability bit (linux/capability.h) that TUN devices, routes, rules and nft tables need.
CAP_NET_ADMIN = 12
#: Without CAP_NET_ADMIN in the effective set: the one line ``up``, ``serve`` and ``down`` print.
NO_CAP_NET_ADMIN = "needs root or CAP_NET_ADMIN to create TUN devices and routes (try sudo)"


def address_family(host: str) -> int:
    """The socket family of a numeric address: AF_INET6 if it has a colon, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class AppError(Exception):
    """A reason the program cannot run as configured: one line for the user, exit code 2."""


def missing_privilege(
    status_path: str = "/proc/self/status",
    tun_path: str = "/dev/net/tun",
    *,
    can_open: Callable[[str], bool] | None = None,
) -> str | None:
    """Why this process cannot create TUN devices and routes, or None if it can.

    The capability decides, not the uid: root in a container may lack
    CAP_NET_ADMIN, and a non-root process may have been granted it (a unit's
    ``AmbientCapabilities=``, docs/service.md).  Such a process also needs
    read and write access to ``tun_path``, which root gets from CAP_DAC_OVERRIDE
    and anyone else from the file's mode: udev's default is 0666, a bare
    devtmpfs node is 0600.  ``can_open`` (default: ``os.access`` by the
    effective ids) is injected by tests.
    """
    if not os.path.exists(tun_path):
        return f"{tun_path} is missing (load the tun module or run where TUN devices exist)"
    try:
        with open(status_path, encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    if int(line.split()[1], 16) >> CAP_NET_ADMIN & 1:
                        return _tun_unreachable(tun_path, can_open)
                    break
    except (OSError, ValueError):
        if os.geteuid() == 0:
            return None  # no /proc to ask: trust root, the TUN driver reports a refusal in one line
    return NO_CAP_NET_ADMIN


def _readable_writable(path: str) -> bool:
    return os.access(path, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids)


def _tun_unreachable(tun_path: str, can_open: Callable[[str], bool] | None) -> str | None:
    """None if ``tun_path`` may be opened read-write; else why not, with the two ways out."""
    if (can_open or _readable_writable)(tun_path):
        return None
    try:
        mode = f"mode {os.stat(tun_path).st_mode & 0o777:04o}"
    except OSError as exc:
        mode = exc.strerror or str(exc)
    return (
        f"has CAP_NET_ADMIN but cannot open {tun_path} as uid {os.geteuid()} ({mode}): "
        "run as root, or give it mode 0666 as udev does by default (docs/service.md, Privileges)"
    )


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
